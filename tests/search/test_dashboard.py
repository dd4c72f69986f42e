"""The web dashboard in a real browser: headless Debian Chromium driven by Playwright against one
real `search serve` (token, local Ray) with one real search on the tiny SDXL model, shared by
the whole module. What the page shows and draws is checked against the SQLite file itself
(read-only): counts, the points uPlot plotted and the heatmap's pixels, recomputed here from the
stored rows; downloads against what `search download` and `search plot` write from the file.

Without Playwright or Chromium (MBP_TEST_CHROMIUM, default /usr/bin/chromium) the module is
skipped on a developer's machine and *fails* under CI=true (scripts/setup.sh installs both when
it can: Debian's `chromium` needs root for apt-get). The picture in docs/ is refreshed by
scripts/dashboard_screenshot.py, never by a test.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import secrets
import shutil
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from tests.cli_helpers import error_line, run_cli
from tests.search.test_service import ACTIVE, ServiceProcess, ray_env, wait_for

CHROMIUM = Path(os.environ.get("MBP_TEST_CHROMIUM", "/usr/bin/chromium"))
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]
# Two formats (a heatmap with two rows, two cumulative curves); ~2 minutes on 2 shared cores.
SEARCH = dict(model="tiny-sdxl", nbits="4,8", min_size=16384, num_recipes=3)
try:  # the gallery phase (issue 31), where the service has it: 2 denoising steps per image are enough here
    from search.submit_options import SEARCH_OPTIONS

    GALLERY = {"gallery_steps": 2} if any(o.name == "gallery_steps" for o in SEARCH_OPTIONS) else {}
except ImportError:  # pragma: no cover
    GALLERY = {}
SEARCH.update(GALLERY)
TIMEOUT_S = 600


def browser_missing(reason: str) -> None:
    """No browser, no dashboard tests: a skip with the reason, but a failure under CI, where a
    silently skipped module would let a broken dashboard through."""
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(f"{reason}; CI=true, so the dashboard's browser tests must run", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


try:
    import playwright.sync_api as playwright_api
except ImportError:
    browser_missing("playwright is not installed (pip install -e '.[test]')")
if not CHROMIUM.exists():
    browser_missing(f"no Chromium at {CHROMIUM} (scripts/setup.sh installs Debian's chromium as root)")

pytestmark = pytest.mark.slow

# Keeps every uPlot chart the page creates on its element (el.__uplot), so a test reads the data
# uPlot plotted, not what the page says it plotted. Set before the page's scripts run.
KEEP_UPLOTS = """(() => {
  let wrapped;
  Object.defineProperty(window, "uPlot", { configurable: true, get: () => wrapped, set: (U) => {
    wrapped = function (opts, data, el) { const u = new U(opts, data, el); if (el) el.__uplot = u; return u; };
    Object.assign(wrapped, U);
    wrapped.prototype = U.prototype;
  }});
})();"""

# Per series of the uPlot chart in `sel`: its label, legend colour (the marker's fill, or its
# border where it has none: a point's colour, found by the series' label), the (x, y) points it
# plotted (null y: no point), and the canvas pixels at each point's centre and 3 px above and
# below (a dashed line may cross a centre).
PLOTTED = """(sel) => {
  const el = document.querySelector(sel), u = el && el.__uplot;
  if (!u) return null;
  const markers = Object.fromEntries([...el.querySelectorAll(".u-legend .u-series")].map((row) => {
    const m = row.querySelector(".u-marker"), label = row.querySelector(".u-label");
    if (!m || !label) return [null, null];
    const fill = getComputedStyle(m).backgroundColor;  // a marker without a fill shows its colour as its border
    return [label.textContent, fill === "rgba(0, 0, 0, 0)" ? getComputedStyle(m).borderTopColor : fill];
  }));
  const pixel = (x, y) => Array.from(u.ctx.getImageData(Math.round(x), Math.round(y), 1, 1).data.slice(0, 3));
  return u.series.slice(1).map((s, i) => {
    const points = u.data[0].map((x, j) => [x, u.data[i + 1][j]]).filter((p) => p[1] !== null && p[1] !== undefined);
    const d = 3 * devicePixelRatio;
    return { label: s.label, color: markers[s.label], points: points, pixels: points.map(([x, y]) => {
      const cx = u.valToPos(x, "x", true), cy = u.valToPos(y, "y", true);
      return [pixel(cx, cy), pixel(cx, cy - d), pixel(cx, cy + d)];
    }) };
  });
}"""

# The heatmap canvas's pixel at the centre of every (layer, format) cell: rows of formats.
HEAT_PIXELS = """([layers, formats]) => {
  const canvas = document.querySelector("#chart-heatmap canvas"), ctx = canvas.getContext("2d");
  const width = Math.max(Math.min(layers * 12, 1200), 300), left = 50, rowH = 24, cw = width / layers;
  return [...Array(formats).keys()].map((fi) => [...Array(layers).keys()].map((li) => Array.from(
    ctx.getImageData(Math.floor(left + (li + 0.5) * cw), fi * rowH + 12, 1, 1).data.slice(0, 3))));
}"""
HEAT_BACKGROUND = (243, 244, 246)  # #f3f4f6: a cell nothing was measured for
HEAT_STOPS = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]  # worst .. best PSNR
STRATEGY_LABELS = {"apple": "Apple's thresholds", "optimal": "optimal (knapsack)", "refined": "refined (measured)"}
PLOT_MAX_PSNR = 150.0  # the charts clip PSNRs above this (bit-exact runs: ~200 dB or inf)


def db_counts(db: Path, sid: str) -> dict:
    """What the page must show, read straight from the SQLite file (read-only)."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        q = lambda sql: con.execute(sql, (sid,)).fetchall()  # noqa: E731
        phases = dict(q("SELECT phase, COUNT(*) FROM measurements WHERE search_id = ? GROUP BY phase"))
        per_format = dict(q("SELECT bits || CASE WHEN group_size > 0 THEN 'g' || group_size ELSE '' END, COUNT(*) "
                            "FROM measurements WHERE search_id = ? AND phase = 'isolated' GROUP BY 1"))
        recipes = dict(q("SELECT strategy, COUNT(*) FROM recipes WHERE search_id = ? AND psnr IS NOT NULL "
                         "GROUP BY strategy"))
        status, evaluations = q("SELECT status, evaluations FROM searches WHERE id = ?")[0]
        first = q("SELECT layer, bits, psnr FROM measurements WHERE search_id = ? AND phase = 'isolated' "
                  "ORDER BY id LIMIT 1")
        return {"phases": phases, "isolated_per_format": per_format, "recipes": recipes, "status": status,
                "evaluations": evaluations, "first_isolated": first[0] if first else None}
    finally:
        con.close()


def mean_psnr(per_prompt_json: str) -> float:
    return min(statistics.fmean(json.loads(per_prompt_json)), PLOT_MAX_PSNR)


def drawn_reference(db: Path, sid: str) -> dict:
    """What the charts must draw, recomputed from the stored rows: the size reduction vs float16
    of a recipe (100 * (1 - avg_bits / 16)) and of the first i layers of a cumulative curve at b
    bits (their saved 16 - b bits per weight over all candidates' 16), mean PSNRs over prompts."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        q = lambda sql, *args: con.execute(sql, (sid, *args)).fetchall()  # noqa: E731
        nbits = json.loads(q("SELECT config_json FROM searches WHERE id = ?")[0][0])["nbits"]
        layers = q("SELECT name, numel FROM layers WHERE search_id = ? ORDER BY ordinal")
        numel, total = dict(layers), sum(n for _, n in layers)
        isolated = {(layer, str(bits)): mean_psnr(pp) for layer, bits, pp in q(
            "SELECT layer, bits, per_prompt_json FROM measurements WHERE search_id = ? AND phase = 'isolated'")}
        curves = {}
        for bits in nbits:
            saved, curves[f"{bits}-bit"] = 0, []
            for layer, pp in q("SELECT layer, per_prompt_json FROM measurements WHERE search_id = ? AND "
                               "phase = 'cumulative' AND bits = ? ORDER BY position", bits):
                saved += (16 - bits) * numel[layer]
                curves[f"{bits}-bit"].append((100 * saved / (16 * total), mean_psnr(pp)))
        recipes: dict[str, list] = {}
        for strategy, avg_bits, pp in q("SELECT strategy, avg_bits, per_prompt_json FROM recipes WHERE search_id = ? "
                                        "AND psnr IS NOT NULL"):
            recipes.setdefault(strategy, []).append((100 * (1 - avg_bits / 16), mean_psnr(pp)))
        linear8 = q("SELECT per_prompt_json FROM baselines WHERE search_id = ? AND name = 'linear_8bit'")
        return {"formats": [str(b) for b in nbits], "layers": [name for name, _ in layers], "isolated": isolated,
                "curves": curves, "recipes": recipes, "linear8": mean_psnr(linear8[0][0]) if linear8 else None}
    finally:
        con.close()


def same_points(drawn, expected, x_tol: float = 1e-3, y_tol: float = 2e-3) -> bool:
    """The same (x, y) points (the page rounds: 4 decimals for x, 3 for y), in any order."""
    a, b = sorted(map(tuple, drawn)), sorted(expected)
    return len(a) == len(b) and all(abs(p[0] - q[0]) <= x_tol and abs(p[1] - q[1]) <= y_tol for p, q in zip(a, b))


def rgb(css: str) -> tuple[int, ...]:
    return tuple(int(v) for v in re.findall(r"\d+", css)[:3])


def heat_color(t: float) -> tuple[int, ...]:
    """The legend's scale: 0 (worst) dark purple .. 1 (best) bright yellow, linear between stops."""
    p = max(0.0, min(1.0, t)) * (len(HEAT_STOPS) - 1)
    i = min(int(p), len(HEAT_STOPS) - 2)
    f = p - i
    return tuple(int(a + (b - a) * f + 0.5) for a, b in zip(HEAT_STOPS[i], HEAT_STOPS[i + 1]))


def close(a, b, tol: int = 2) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b))


@pytest.fixture(scope="module")
def dash(tmp_path_factory, model_cache):
    """One service with one search running; the search's id in ``dash.sid``."""
    base = tmp_path_factory.mktemp("dashboard")
    raytmp = tempfile.mkdtemp(prefix="mbpdb", dir="/tmp")
    env = ray_env(model_cache, secrets.token_hex(16), tmpdir=raytmp)
    srv = ServiceProcess(base / "searches.db", env, secrets.token_urlsafe(24), base / "serve.log")
    srv.base = base
    try:
        srv.start()
        r = srv.client().post("/searches", json=SEARCH)
        assert r.status_code == 201, r.text
        srv.sid = r.json()["id"]
        yield srv
    finally:
        srv.stop()
        shutil.rmtree(raytmp, ignore_errors=True)


@pytest.fixture(scope="module")
def page(dash):
    """One browser tab for the module: the token is asked once and kept in its sessionStorage."""
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS, headless=True)
        context = browser.new_context(viewport={"width": 1300, "height": 1000}, accept_downloads=True)
        context.add_init_script(KEEP_UPLOTS)
        tab = context.new_page()
        tab.requested = []
        tab.errors = []
        tab.on("request", lambda req: tab.requested.append(req.url))
        tab.on("pageerror", lambda exc: tab.errors.append(str(exc)))
        tab.set_default_timeout(30_000)
        yield tab
        browser.close()


def api(dash, path: str):
    return dash.client().get(path).json()


def test_list_updates_live_and_the_token_is_asked_once(dash, page):
    page.goto(dash.url + "/")
    page.wait_for_selector("#token-form:not([hidden])")  # the data routes answered 401
    page.fill("#token-input", dash.token)
    page.click("#token-form button")
    row = page.locator(f"tr[data-id='{dash.sid}']")
    row.wait_for()
    page.evaluate("window.__sameDocument = 'no reload'")
    shown = []
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline and len(set(shown)) < 4:
        shown.append(int(row.get_attribute("data-evaluations")))
        stored = db_counts(dash.db, dash.sid)["evaluations"]
        assert shown[-1] <= stored, (shown, stored)  # shown: what was stored at the last poll
        time.sleep(0.5)
    assert len(set(shown)) >= 4 and shown == sorted(shown), shown
    assert page.evaluate("window.__sameDocument") == "no reload"
    assert int(page.get_attribute("#view", "data-polls")) >= 3
    # Asked once: a reload in the same tab goes straight to the list.
    page.reload()
    page.locator(f"tr[data-id='{dash.sid}']").wait_for()
    assert page.is_hidden("#token-form")
    assert not any(dash.token in url for url in page.requested)
    assert dash.token not in dash.log_tail(10**7)
    print(f"\nevaluations shown while the search ran, polled every 0.5 s: {sorted(set(shown))}")


def test_submit_form_errors_and_cancel(dash, page):
    page.goto(dash.url + "/#/")
    page.wait_for_selector("#submit-form")
    # A bad model name: the server's one-line reason, verbatim.
    page.fill("#submit-form input[name=model]", "not a repo id!")
    page.click("#submit-button")
    page.wait_for_function("document.querySelector('#submit-error').textContent.length > 0")
    expected = dash.client().post("/searches", json={"model": "not a repo id!"}).json()["detail"]
    shown = page.text_content("#submit-error")
    assert shown == expected and "\n" not in shown and "unknown model 'not a repo id!'" in shown
    # A good one starts a search, listed without a reload; cancel and resume from its row.
    before = {row["id"] for row in api(dash, "/searches")}
    page.fill("#submit-form input[name=model]", "tiny-sdxl")
    page.fill("#submit-form input[name=nbits]", "8")
    page.fill("#submit-form input[name=min_size]", "16384")
    page.fill("#submit-form input[name=num_recipes]", "2")
    page.fill("#submit-form input[name=workers]", "1")
    if GALLERY:
        page.fill("#submit-form input[name=gallery_steps]", "2")
    page.click("#submit-button")
    page.wait_for_function("document.querySelector('#view').dataset.lastSubmitted")
    new = page.get_attribute("#view", "data-last-submitted")
    assert new not in before and page.text_content("#submit-error") == ""
    stored = api(dash, f"/searches/{new}")
    assert stored["config"]["nbits"] == [8] and stored["config"]["num_recipes"] == 2
    page.locator(f"tr[data-id='{new}'] button[data-act=cancel]").click()
    wait_for(lambda: db_counts(dash.db, new)["status"], lambda s: s == "cancelled", 120, "the cancel")
    page.locator(f"tr[data-id='{new}'][data-status=cancelled] button[data-act=resume]").wait_for()
    dash.second = new  # resumed by the compare test, once the first search has finished


def test_search_page_charts_draw_what_was_measured(dash, page):
    c = dash.client()
    wait_for(lambda: c.get(f"/searches/{dash.sid}").json(), lambda d: d["status"] not in ACTIVE, TIMEOUT_S,
             "the search to finish", interval=2)
    page.goto(dash.url + f"/#/search/{dash.sid}")
    page.wait_for_selector("#view[data-status=completed]")
    page.wait_for_function("(document.querySelector('#view').dataset.chartsVersion || '').includes('completed')")
    db = db_counts(dash.db, dash.sid)
    ref = drawn_reference(dash.db, dash.sid)
    assert db["status"] == "completed" and db["phases"]["isolated"] == 94  # 47 layers x 2 formats
    assert db["isolated_per_format"] == {"4": 47, "8": 47}
    # Heatmap: every measured (layer, format) cell painted in the colour of its PSNR on the legend's
    # scale, nothing painted where nothing was measured; each format's row holds its measurements.
    formats, layers = ref["formats"], ref["layers"]
    pixels = page.evaluate(HEAT_PIXELS, [len(layers), len(formats)])
    lo, hi = min(ref["isolated"].values()), max(ref["isolated"].values())
    painted = {f: 0 for f in formats}
    for fi, f in enumerate(formats):
        for li, layer in enumerate(layers):
            psnr, got = ref["isolated"].get((layer, f)), tuple(pixels[fi][li])
            want = HEAT_BACKGROUND if psnr is None else heat_color((psnr - lo) / (hi - lo) if hi > lo else 1.0)
            assert close(got, want), (layer, f, psnr, got, want)
            painted[f] += got != HEAT_BACKGROUND
    assert painted == db["isolated_per_format"], (painted, db["isolated_per_format"])
    # The two uPlot charts: the points uPlot plotted, recomputed from the stored rows.
    psnr_chart = {s["label"]: s for s in page.evaluate(PLOTTED, "#chart-psnr")}
    expected = {STRATEGY_LABELS[st]: pts for st, pts in ref["recipes"].items()}
    assert set(psnr_chart) == {*expected, "linear_8bit"}, set(psnr_chart)
    for label, pts in expected.items():
        drawn = psnr_chart[label]
        assert same_points(drawn["points"], pts), (label, drawn["points"], pts)
        for (x, y), around in zip(drawn["points"], drawn["pixels"]):  # each point is on the canvas, in its colour
            assert any(close(px, rgb(drawn["color"]), 8) for px in around), (label, x, y, around, drawn["color"])
    line = psnr_chart["linear_8bit"]["points"]
    assert line and all(abs(y - ref["linear8"]) <= 1e-9 for _, y in line), (line, ref["linear8"])
    cumulative = {s["label"]: s["points"] for s in page.evaluate(PLOTTED, "#chart-cumulative")}
    assert set(cumulative) == set(ref["curves"]), set(cumulative)
    for label, pts in ref["curves"].items():
        assert len(pts) == 47 and same_points(cumulative[label], pts), (label, cumulative[label], pts)
    assert page.get_attribute("#chart-psnr", "data-recipes") == ",".join(
        f"{k}:{v}" for k, v in sorted(db["recipes"].items()))
    assert page.text_content("#evals").split(" / ")[0] == str(db["evaluations"])
    assert page.locator("#recipes tbody tr").count() == sum(db["recipes"].values())
    # Hovering a heatmap cell names the layer, the format, its PSNR and MB: the first measured one.
    layer, bits, psnr = db["first_isolated"]
    assert c.get(f"/searches/{dash.sid}/measurements").json()["layers"] == layers
    li, fi = layers.index(layer), formats.index(str(bits))
    box = page.locator("#chart-heatmap canvas").bounding_box()
    cw = max(min(len(layers) * 12, 1200), 300) / len(layers)
    page.mouse.move(box["x"] + 50 + (li + 0.5) * cw, box["y"] + fi * 24 + 12)
    tip = page.text_content("#tooltip")
    assert page.is_visible("#tooltip") and tip.startswith(f"{layer} · {bits}-bit · "), tip
    shown_db, mb = map(float, re.fullmatch(r".* · ([\d.]+) dB · ([\d.]+) MB", tip).groups())
    assert abs(shown_db - psnr) <= 0.005 + 1e-6, (tip, psnr)
    numel = next(n for name, n in sqlite3.connect(f"file:{dash.db}?mode=ro", uri=True).execute(
        "SELECT name, numel FROM layers WHERE search_id = ?", (dash.sid,)) if name == layer)
    assert abs(mb - (numel * bits + 2 ** bits * 16) / 8e6) <= 0.0005 + 1e-9, (mb, numel)  # indices + fp16 LUT
    page.mouse.move(0, 0)
    assert not page.errors, page.errors


def module_runs(layers: list[str]) -> int:
    """Runs of consecutive layers in one module group (down_blocks.0, mid_block, ...)."""
    groups = [".".join(name.split(".")[:2]) if name.split(".")[1:2] and name.split(".")[1].isdigit()
              else name.split(".")[0] for name in layers]
    return sum(1 for i, g in enumerate(groups) if i == 0 or groups[i - 1] != g)


# The layer map canvas's pixel at the centre of every (recipe row, layer) cell.
MAP_PIXELS = """(layers) => {
  const el = document.querySelector("#layer-map"), canvas = el.querySelector("canvas"), ctx = canvas.getContext("2d");
  const rows = Number(el.dataset.rows), width = Math.max(Math.min(layers * 12, 1200), 300), cw = width / layers;
  return [...Array(rows).keys()].map((ri) => [...Array(layers).keys()].map((li) => Array.from(
    ctx.getImageData(Math.floor(170 + (li + 0.5) * cw), ri * 16 + 8, 1, 1).data.slice(0, 3))));
}"""
LEGEND = """() => Object.fromEntries([...document.querySelectorAll("#layer-map .format-legend span")].map((s) =>
  [s.textContent, getComputedStyle(s.querySelector("i")).backgroundColor]))"""


def signed_in(dash, page) -> None:
    """The tab holds the token (as after the form), whichever test runs first."""
    page.goto(dash.url + "/#/")
    page.evaluate("(t) => sessionStorage.setItem('mbp-search-token', t)", dash.token)
    page.reload()


def test_search_page_phases_layer_map_and_hover(dash, page):
    """One phase row per phase (the progress file's entries grouped), the heatmap's colour bar and
    module groups, the layer map painted from each stored recipe's formats, and a hover that
    names the one point under the pointer."""
    c = dash.client()
    wait_for(lambda: c.get(f"/searches/{dash.sid}").json(), lambda d: d["status"] not in ACTIVE, TIMEOUT_S,
             "the search to finish", interval=2)
    signed_in(dash, page)
    page.goto(dash.url + f"/#/search/{dash.sid}")
    page.wait_for_selector("#view[data-status=completed]")
    page.wait_for_function("(document.querySelector('#view').dataset.chartsVersion || '').includes('completed')")
    # Phases: the rows are the distinct phases of the progress file, with the summed counts.
    progress = json.loads((dash.db.parent / (dash.db.name + ".service") / "progress" / f"{dash.sid}.json").read_text())
    expected = {}
    for e in progress["phases"]:
        done, total = expected.get(e["phase"], (0, 0))
        expected[e["phase"]] = (done + e["done"], total + e["total"])
    rows = page.locator("#phases tbody tr")
    shown = {rows.nth(i).get_attribute("data-phase"): rows.nth(i).locator("td").nth(2).text_content()
             for i in range(rows.count())}
    assert rows.count() == len(expected) == len(shown), (shown, expected)
    assert shown == {k: f"{d} / {t}" for k, (d, t) in expected.items()}, (shown, expected)
    # Heatmap: a colour bar from the lowest to the highest isolated PSNR, and module groups.
    ref = drawn_reference(dash.db, dash.sid)
    lo, hi = min(ref["isolated"].values()), max(ref["isolated"].values())
    assert page.text_content("#chart-heatmap .colour-bar") == f"{lo:.1f} dB{hi:.1f} dB"
    assert int(page.get_attribute("#chart-heatmap", "data-groups")) == module_runs(ref["layers"]) > 3
    # Layer map: one row per stored recipe, each cell in its legend colour of the stored format.
    con = sqlite3.connect(f"file:{dash.db}?mode=ro", uri=True)
    stored = {k: json.loads(b) for k, b in con.execute("SELECT key, bits_json FROM recipes WHERE search_id = ?",
                                                       (dash.sid,))}
    con.close()
    keys = page.get_attribute("#layer-map", "data-keys").split(",")
    assert sorted(keys) == sorted(stored), (keys, list(stored))
    legend = {label: rgb(css) for label, css in page.evaluate(LEGEND).items()}
    pixels = page.evaluate(MAP_PIXELS, len(ref["layers"]))
    for ri, key in enumerate(keys):
        for li, layer in enumerate(ref["layers"]):
            f = str(stored[key].get(layer, 16))
            want = legend["float16 (kept)" if f == "16" else f + "-bit"]
            assert close(tuple(pixels[ri][li]), want), (key, layer, f, pixels[ri][li], want)
    # Capped recipes (mean PSNR over the charts' ceiling: the bit-exact 16-bit recipe) are marked.
    con = sqlite3.connect(f"file:{dash.db}?mode=ro", uri=True)
    means = [statistics.fmean(json.loads(pp)) for (pp,) in con.execute(
        "SELECT per_prompt_json FROM recipes WHERE search_id = ? AND psnr IS NOT NULL", (dash.sid,))]
    con.close()
    assert int(page.get_attribute("#chart-psnr", "data-capped")) == sum(m > PLOT_MAX_PSNR for m in means)
    # Hover on a recipe point: the tooltip names that recipe and its own values, nothing else.
    r = sorted((r for r in c.get(f"/searches/{dash.sid}/measurements").json()["recipes"] if not r["capped"]),
               key=lambda r: r["x"])[0]
    at = page.evaluate("""([x, y]) => { const u = document.querySelector('#chart-psnr').__uplot,
      b = u.over.getBoundingClientRect(); return [b.left + u.valToPos(x, 'x'), b.top + u.valToPos(y, 'y')]; }""",
                       [r["x"], r["y"]])
    page.mouse.move(at[0], at[1])
    hover = page.get_attribute("#chart-psnr", "data-hover")
    assert hover.startswith(f"{r['key']} · {r['strategy']} · {r['avg_bits']:.2f} bits"), (hover, r)
    shown = float(re.fullmatch(r".* · ([\d.]+) dB", hover).group(1))  # JS and Python round a tie differently
    assert abs(shown - r["y"]) <= 0.005 + 1e-9 and page.text_content("#tooltip") == hover, (hover, r)
    page.mouse.move(0, 0)
    assert not page.errors, page.errors


# SHA-256 of the bytes behind an <img>'s object URL: the image file the page shows.
IMG_SHA = """async (sel) => { const img = document.querySelector(sel);
  const buf = await (await fetch(img.src)).arrayBuffer();
  return [...new Uint8Array(await crypto.subtle.digest("SHA-256", buf))].map((b) => b.toString(16).padStart(2, "0")).join(""); }"""


def test_gallery_shows_every_stored_image_and_compares_with_float16(dash, page):
    """The gallery of a finished search: one thumbnail per (row, prompt) of GET /searches/{id}/images,
    each the very file the service stores; a click opens it beside the float16 image of the same
    prompt with its metrics; the recipes table shows each recipe's mean image PSNR and SSIM."""
    c = dash.client()
    wait_for(lambda: c.get(f"/searches/{dash.sid}").json(), lambda d: d["status"] not in ACTIVE, TIMEOUT_S,
             "the search to finish", interval=2)
    r = c.get(f"/searches/{dash.sid}/images")
    if r.status_code == 404 and "images" not in r.text.lower():
        pytest.skip("this service has no gallery routes (GET /searches/{id}/images)")
    d = r.json()
    signed_in(dash, page)
    page.goto(dash.url + f"/#/search/{dash.sid}")
    page.wait_for_selector("#view[data-status=completed]")
    if d["status"] != "done":  # e.g. --no-gallery: the one-line hint, nothing else
        page.wait_for_selector("#gallery-hint")
        assert f"search images {dash.sid}" in page.text_content("#gallery-hint")
        return
    total = sum(len(row["images"]) for row in d["rows"])
    page.wait_for_function(f"document.querySelectorAll('#gallery img.thumb').length === {total}")
    page.wait_for_function("[...document.querySelectorAll('#gallery img.thumb')].every((i) => i.complete && i.naturalWidth > 0)")
    assert [page.locator("#gallery-grid tr[data-key]").nth(i).get_attribute("data-key")
            for i in range(len(d["rows"]))] == [row["key"] for row in d["rows"]]
    for row in d["rows"]:
        for im in row["images"]:
            sel = f"#gallery img.thumb[data-key='{row['key']}'][data-prompt='{im['prompt']}']"
            data = c.get(im["url"]).content
            assert page.evaluate(IMG_SHA, sel) == hashlib.sha256(data).hexdigest() == im["sha256"], (row["key"], im)
    # Compare: a recipe's image of prompt 0 beside the float16 one, its metrics under them.
    row = next(r for r in d["rows"] if r["key"] not in ("original", "linear_8bit") and r["images"][0]["psnr"] is not None)
    im, ref = row["images"][0], next(r for r in d["rows"] if r["key"] == "original")["images"][0]
    page.click(f"#gallery img.thumb[data-key='{row['key']}'][data-prompt='0']")
    page.wait_for_function("(() => { const a = document.querySelector('#cmp-img'), b = document.querySelector('#cmp-ref');"
                           " return a && b && a.complete && b.complete && a.naturalWidth > 0 && b.naturalWidth > 0; })()")
    assert page.evaluate(IMG_SHA, "#cmp-img") == im["sha256"] and page.evaluate(IMG_SHA, "#cmp-ref") == ref["sha256"]
    metrics = page.text_content("#cmp-metrics")
    shown = re.search(r"PSNR ([\d.]+) dB · SSIM ([\d.]+) vs float16", metrics)
    assert shown and abs(float(shown.group(1)) - im["psnr"]) <= 0.005 + 1e-9 and \
        abs(float(shown.group(2)) - im["ssim"]) <= 0.00005 + 1e-12, (metrics, im)
    page.fill("#wipe", "30")
    page.dispatch_event("#wipe", "input")
    assert page.get_attribute(".wipe-top", "style").replace(" ", "") == "clip-path:inset(0px70%0px0px);" or \
        "70%" in page.evaluate("getComputedStyle(document.querySelector('.wipe-top')).clipPath")
    # The recipes table: each recipe's mean image PSNR and SSIM, as the images JSON has them.
    means = {r["key"]: r for r in d["rows"]}
    checked = 0
    for tr in page.locator("#recipes tbody tr").all():
        key = tr.locator("td").nth(0).text_content()
        if key in means:
            psnr, ssim = (tr.locator("td").nth(i).text_content() for i in (6, 7))
            want = means[key]["psnr_mean"]
            assert (psnr == "—") if want is None else abs(float(psnr) - want) <= 0.005 + 1e-9, (key, psnr, want)
            assert abs(float(ssim) - means[key]["ssim_mean"]) <= 0.00005 + 1e-12, (key, ssim)
            checked += 1
    assert checked == len(d["rows"]) - 2  # every recipe (the rows less float16 and linear 8-bit)
    assert not page.errors, page.errors


def png_pixels(data: bytes) -> tuple:
    """(width, height, SHA-256 of the RGBA pixels): the picture, whatever the PNG's metadata."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return *im.size, hashlib.sha256(im.convert("RGBA").tobytes()).hexdigest()


def test_downloads_are_what_search_download_writes(dash, page, model_cache):
    page.goto(dash.url + f"/#/search/{dash.sid}")
    page.wait_for_selector("#view[data-status=completed]")
    with page.expect_download() as dl:
        page.click("#dl-json")
    got = Path(dl.value.path()).read_bytes()
    cli = run_cli("download", dash.sid, "-o", "-", "--db", dash.db, model_cache=model_cache)
    assert cli.returncode == 0, cli.stderr
    assert got == cli.stdout.encode() and json.loads(got)["mbp_search"]["search_id"] == dash.sid
    assert dl.value.suggested_filename == f"{dash.sid}-recipes.json"
    with page.expect_download() as dl:
        page.click("#dl-plot")
    png = Path(dl.value.path()).read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and dl.value.suggested_filename == f"{dash.sid}-psnr.png"
    # The same picture as `search plot` draws now from the SQLite file, read here (the service
    # hands out a file it drew earlier and keeps: a stale or another search's one differs here).
    from search.read_models import plot_png
    from storage.reader import ReadOnlyStorage

    reader = ReadOnlyStorage(dash.db)
    try:
        assert png_pixels(png) == png_pixels(plot_png(reader, reader.get_search(dash.sid)))
    finally:
        reader.close()


def test_compare_draws_both_searches_recipes(dash, page):
    c = dash.client()
    second = getattr(dash, "second", None)
    if second is None:
        pytest.skip("the submit test did not start a second search")
    wait_for(lambda: c.get(f"/searches/{dash.sid}").json(), lambda d: d["status"] not in ACTIVE, TIMEOUT_S,
             "the first search to finish", interval=2)  # two searches would share 2 cores
    page.goto(dash.url + "/#/")
    page.locator(f"tr[data-id='{second}'] button[data-act=resume]").click()
    wait_for(lambda: db_counts(dash.db, second)["status"], lambda s: s in ACTIVE, 60, "the resume")
    d = wait_for(lambda: c.get(f"/searches/{second}").json(), lambda d: d["status"] not in ACTIVE, TIMEOUT_S,
                 "the resumed search to finish", interval=2)
    assert d["status"] == "completed", {k: d[k] for k in ("status", "phase", "error", "measurements")}
    page.goto(dash.url + "/#/")
    for sid in (dash.sid, second):
        page.locator(f"tr[data-id='{sid}'] input[type=checkbox]").check()
    page.click("#compare-button")
    page.wait_for_function("(document.querySelector('#chart-compare') || {}).__uplot !== undefined")
    series = page.evaluate(PLOTTED, "#chart-compare")
    drawn = {tuple(s["label"].split()[:2]): s for s in series}
    expected = {(sid, st): pts for sid in (dash.sid, second) for st, pts in drawn_reference(dash.db, sid)["recipes"].items()}
    assert set(drawn) == set(expected) and len(series) == len(expected), (set(drawn), set(expected))
    for key, pts in expected.items():  # a marker series per (search, strategy): its measured recipes
        assert same_points(drawn[key]["points"], pts), (key, drawn[key]["points"], pts)
    borders = page.evaluate("""() => [...document.querySelectorAll('#chart-compare .u-legend .u-series')]
      .filter((r) => r.querySelector('.u-label')).map((r) => [r.querySelector('.u-label').textContent, getComputedStyle(r.querySelector('.u-marker')).borderColor])""")
    colours = {sid: {c for label, c in borders if label.startswith(sid + " ")} for sid in (dash.sid, second)}
    assert all(len(c) == 1 for c in colours.values()) and colours[dash.sid] != colours[second], colours
    # The recipes table: every stored recipe of both searches; the config table: what differs.
    rows = page.locator("#compare-recipes tbody tr")
    assert sorted(rows.nth(i).get_attribute("data-search") for i in range(rows.count())) == sorted(
        [dash.sid] * len(api(dash, f"/searches/{dash.sid}")["recipes"]) + [second] * len(api(dash, f"/searches/{second}")["recipes"]))
    configs = [api(dash, f"/searches/{sid}")["config"] for sid in (dash.sid, second)]
    differ = sorted(k for k in set(configs[0]) | set(configs[1]) if configs[0].get(k) != configs[1].get(k))
    shown = page.locator("#compare-config tbody tr")
    assert sorted(shown.nth(i).get_attribute("data-key") for i in range(shown.count())) == differ
    assert {"nbits", "num_recipes"} <= set(differ)
    # An unknown id: one error line for it, the others drawn all the same.
    page.goto(dash.url + f"/#/compare/{dash.sid},nosuchid,{second}")
    page.locator(".compare-error[data-id=nosuchid]").wait_for()
    page.wait_for_function("(document.querySelector('#chart-compare') || {}).__uplot !== undefined")
    errors = page.locator("#compare-errors .error")
    assert errors.count() == 1 and errors.text_content().startswith("nosuchid: ") and "\n" not in errors.text_content()
    assert len(page.evaluate(PLOTTED, "#chart-compare")) == len(expected)
    assert not page.errors, page.errors


def test_docs_page_works_offline(dash, page):
    page.goto(dash.url + "/docs")
    page.locator(".opblock-summary-path", has_text="/measurements").first.wait_for()
    hosts = {httpx.URL(u).host for u in page.requested if u.startswith("http")}
    assert hosts == {"127.0.0.1"}, hosts  # every script, style and schema from the service itself


def test_recipe_over_the_server_is_the_plan_of_the_stored_measurements(dash, model_cache, tmp_path):
    """`search recipe --server`: built and measured on the service, the recipe the knapsack plans
    from the stored measurements (planned here from a copy of the file), stored in its database;
    a target the measurements cannot meet is one error line, exit 2."""
    c = dash.client()
    wait_for(lambda: c.get(f"/searches/{dash.sid}").json(), lambda d: d["status"] not in ACTIVE, TIMEOUT_S,
             "the search to finish", interval=2)
    copy = tmp_path / "copy.db"
    src = sqlite3.connect(f"file:{dash.db}?mode=ro", uri=True)
    dst = sqlite3.connect(copy)
    src.backup(dst)
    src.close()
    dst.close()
    from search.config import SearchConfig
    from search.recipes.strategy import target_recipe as plan
    from search.recipes.tables import load_tables, weight_mse
    from storage import Storage

    with Storage(copy) as storage:
        s = storage.get_search(dash.sid)
        planned = plan(SearchConfig.from_dict(s.config), load_tables(storage, s.id), weight_mse(storage, s.id), bits=6.0)
    proc = run_cli("recipe", dash.sid, "--bits", "6", "--refine-evals", "0", "--server", dash.url, "--token",
                   dash.token, model_cache=model_cache)
    assert proc.returncode == 0, proc.stderr
    assert "optimal recipe for at most 6 bits per weight" in proc.stdout, proc.stdout
    key = planned.recipe.key
    assert key in proc.stdout, (key, proc.stdout)
    row = sqlite3.connect(f"file:{dash.db}?mode=ro", uri=True).execute(
        "SELECT avg_bits, psnr, bits_json FROM recipes WHERE search_id = ? AND key = ?", (dash.sid, key)).fetchone()
    assert row is not None and row[1] is not None, row
    assert abs(row[0] - planned.recipe.avg_bits) < 1e-9 and json.loads(row[2]) == {
        layer: f.to_json() for layer, f in planned.recipe.bits.items()}
    assert f"{row[1]:.2f}" in proc.stdout
    bad = run_cli("recipe", dash.sid, "--psnr", "999", "--server", dash.url, "--token", dash.token,
                  model_cache=model_cache)
    assert bad.returncode == 2 and "unreachable" in error_line(bad), bad.stderr
