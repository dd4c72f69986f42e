"""What the dashboard costs, measured side by side in one run.

    python benchmarks/dashboard_load.py [--window 10] [--dashboards 3] [--loads 7] [--skip-live] [--skip-page]

1. **Live load.** One real `search serve` (loopback, local Ray) runs one search on the built-in
   tiny SDXL (4- and 8-bit, 93 candidate layers: ~400 evaluations). While it runs,
   ``--dashboards`` pollers are switched on and off in alternating windows of ``--window``
   seconds (off, on, off, on, ...); each poller requests what an open search page requests
   every 2 s (the page's JSON with the evaluators, and the chart points with If-None-Match).
   Evaluations/s per window come from the stored measurements' timestamps (the SQLite file,
   read afterwards). Alternating windows of one search
   keep the comparison fair on a shared machine (drift and phase changes hit both sides).
   Target: evaluations/s with the dashboards within 5 % of without.
2. **Page load.** An SDXL-size search (792 candidate layers x 5 formats: 3,960 isolated and
   3,960 cumulative measurements, baselines, 7 recipes) inserted synthetically into a fresh
   database; a second `search serve` on it; headless Chromium (Debian's, through Playwright)
   opens its search page ``--loads`` times, each from a fresh tab, and times navigation to the
   moment all three charts have drawn every point. Target: < 1 s on loopback.
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]
POLL_S = 2.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Serve:
    """`search serve` without a token on a free loopback port, in its own session."""

    def __init__(self, db: Path, tmp: Path, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, MBP_SEARCH_CACHE=str(tmp / "cache"), HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0",
                   RAY_TMPDIR=tempfile.mkdtemp(prefix="mbpbd", dir="/tmp"))
        env.pop("MBP_SEARCH_TOKEN", None)
        env.pop("RAY_ADDRESS", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "search.cli.app", "serve", "--port", str(self.port),
                                      "--db", str(db), *extra], cwd=ROOT, env=env, start_new_session=True,
                                     stdout=open(tmp / f"serve-{self.port}.log", "w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.5)
        raise SystemExit("search serve did not start")

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)


def poller(url: str, sid: str, on: threading.Event, stop: threading.Event, latencies: list) -> None:
    """One open search page: its two requests every POLL_S while ``on`` is set."""
    etag = None
    with httpx.Client(base_url=url, timeout=60) as c:
        while not stop.is_set():
            if on.is_set():
                t0 = time.perf_counter()
                c.get(f"/dashboard/searches/{sid}").raise_for_status()
                r = c.get(f"/searches/{sid}/measurements", headers={"If-None-Match": etag} if etag else {})
                etag = r.headers.get("etag", etag)
                latencies.append(time.perf_counter() - t0)
            stop.wait(POLL_S)


def live_load(tmp: Path, window: float, n: int) -> dict:
    db = tmp / "live.db"
    srv = Serve(db, tmp)
    try:
        r = httpx.post(srv.url + "/searches", json={"model": "tiny-sdxl", "nbits": "4,8", "min_size": 4096,
                                                    "num_recipes": 3}, timeout=60)
        r.raise_for_status()
        sid = r.json()["id"]
        on, stop, latencies = threading.Event(), threading.Event(), []
        threads = [threading.Thread(target=poller, args=(srv.url, sid, on, stop, latencies), daemon=True)
                   for _ in range(n)]
        for t in threads:
            t.start()
        # Windows start once evaluations flow (evaluators up) and end when the search does.
        while httpx.get(f"{srv.url}/searches/{sid}", timeout=60).json()["evaluations"] < 3:
            time.sleep(0.5)
        windows = []
        while True:
            status = httpx.get(f"{srv.url}/searches/{sid}", timeout=60).json()["status"]
            if status not in ("pending", "running", "cancelling"):
                break
            dashboards = len(windows) % 2 == 1
            on.set() if dashboards else on.clear()
            start = datetime.utcnow()
            time.sleep(window)
            windows.append((dashboards, start, datetime.utcnow()))
        stop.set()
    finally:
        srv.stop()
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    stamps = [datetime.fromisoformat(t) for (t,) in con.execute(
        "SELECT created_at FROM measurements WHERE search_id = ?", (sid,))]
    con.close()
    windows = windows[:-1]  # the last one ran into the end of the search
    rate = {True: [], False: []}
    for dashboards, a, b in windows:
        rate[dashboards].append(sum(a <= t < b for t in stamps) / (b - a).total_seconds())
    k = min(len(rate[True]), len(rate[False]))
    off, on_ = statistics.mean(rate[False][:k]), statistics.mean(rate[True][:k])
    pairs = [b / a for a, b in zip(rate[False][:k], rate[True][:k]) if a > 0]
    return {"status": status, "windows": k, "off": off, "on": on_, "ratio": on_ / off,
            "pair_median": statistics.median(pairs) if pairs else None,
            "poll_ms": statistics.median(latencies) * 1000 if latencies else None, "polls": len(latencies),
            "rates_off": rate[False][:k], "rates_on": rate[True][:k]}


def synthetic_search(db: Path, layers: int = 792, formats=(1, 2, 4, 6, 8), seed: int = 0) -> tuple[str, int]:
    """An SDXL-size completed search, stored through the storage API: layers x formats isolated and
    cumulative measurements, both baselines and 7 measured recipes. Returns (id, measurements)."""
    from common.formats import PaletteFormat
    from search.config import SearchConfig
    from search.recipes.apple_rule import make_recipe
    from storage import Baseline, Layer, Measurement, Storage, StoredRecipe

    rng = random.Random(seed)
    shapes = [(320, 320), (640, 640), (1280, 1280), (1280, 5120), (5120, 1280), (640, 2560), (2048, 1280)]
    cands = [Layer(f"down_blocks.{i // 100}.attentions.{i % 100}.proj_{i}", 0, shapes[i % len(shapes)], "linear")
             for i in range(layers)]
    cands = [Layer(c.name, c.shape[0] * c.shape[1], c.shape, c.kind) for c in cands]
    config = SearchConfig(nbits=tuple(PaletteFormat.of(b) for b in formats), min_size=100_000, resolution=1024)
    st = Storage(db)
    s = st.create_search(model="synthetic-sdxl", model_version="synthetic-sdxl (792 layers)", model_location="-",
                         model_source="synthetic", fingerprint="0" * 64, config=config.to_dict(),
                         config_hash=config.fingerprint(), layers=cands)
    n = 0
    for b in formats:
        for pos, c in enumerate(cands, 1):
            psnr = 40 + 8 * b + rng.random() * 20
            st.add_measurement(s.id, Measurement(f"isolated/{c.name}/{b}", "isolated", PaletteFormat.of(b), c.name,
                                                 None, psnr, (psnr,) * 2, "node", "w", 1.0))
            cum = 90 + 5 * b - 50 * pos / layers
            st.add_measurement(s.id, Measurement(f"cumulative/{b}/{pos}", "cumulative", PaletteFormat.of(b), c.name,
                                                 pos, cum, (cum,) * 2, "node", "w", 1.0))
            n += 2
    st.add_baseline(s.id, Baseline("original", 90.0, (90.0, 90.0), "node", 1.0))
    st.add_baseline(s.id, Baseline("linear_8bit", 70.0, (70.0, 70.0), "node", 1.0))
    sizes = {c.name: c.numel for c in cands}
    for i in range(7):
        r = make_recipe({c.name: formats[(j * (i + 1)) % len(formats)] if j % 7 > i else 16
                         for j, c in enumerate(cands)}, sizes, 60.0 + i)
        st.add_recipe(s.id, StoredRecipe(r.key, r.strategy, r.threshold, None, r.bits, r.avg_bits, r.size_mb, 65.0 + i,
                                         None, None, None, None))
        st.set_recipe_result(s.id, r.key, psnr=66.0 + i, per_prompt=(66.0 + i,), node="node", duration_s=1.0)
    st.update_search(s.id, status="completed", phase="done", finished=True)
    st.close()
    return s.id, n


def page_load(tmp: Path, loads: int) -> dict:
    from playwright.sync_api import sync_playwright

    db = tmp / "sdxl.db"
    t0 = time.perf_counter()
    sid, n = synthetic_search(db)
    insert_s = time.perf_counter() - t0
    srv = Serve(db, tmp, "--no-resume-interrupted")
    times, api = [], {}
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            for path in (f"/dashboard/searches/{sid}", f"/searches/{sid}/measurements", "/dashboard/searches"):
                took = []
                for _ in range(6):  # the first: cold
                    t = time.perf_counter()
                    r = c.get(path)
                    took.append(time.perf_counter() - t)
                api[path] = (took[0] * 1000, statistics.median(took[1:]) * 1000, len(r.content))
            chart = c.get(f"/searches/{sid}/measurements").json()
            expected = [len(chart["isolated"]), sum(len(v["x"]) for v in chart["curves"].values()),
                        len(chart["recipes"])]
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=FLAGS, headless=True)
            for _ in range(loads + 1):  # the first load warms the browser's and the server's caches
                tab = browser.new_context(viewport={"width": 1300, "height": 1000}).new_page()
                t = time.perf_counter()
                tab.goto(f"{srv.url}/#/search/{sid}")
                tab.wait_for_function("(n) => { const h = document.querySelector('#chart-heatmap');"
                                      " return h && h.dataset.points === String(n[0])"
                                      " && document.querySelector('#chart-cumulative').dataset.points === String(n[1])"
                                      " && document.querySelector('#chart-psnr').dataset.points === String(n[2]); }",
                                      arg=expected, polling="raf", timeout=60_000)
                times.append(time.perf_counter() - t)
                tab.context.close()
            browser.close()
    finally:
        srv.stop()
    return {"measurements": n, "insert_s": insert_s, "load_s": times[1:], "api": api, "points": expected}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--window", type=float, default=10.0)
    ap.add_argument("--dashboards", type=int, default=3)
    ap.add_argument("--loads", type=int, default=7)
    ap.add_argument("--skip-live", action="store_true")
    ap.add_argument("--skip-page", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="mbp-dashboard-bench-") as d:
        tmp = Path(d)
        if not args.skip_page:
            r = page_load(tmp, args.loads)
            print(f"page load, SDXL-size search ({r['measurements']} measurements, inserted in {r['insert_s']:.1f} s; "
                  f"heatmap {r['points'][0]}, cumulative {r['points'][1]}, recipe points {r['points'][2]}):")
            print("  search page, navigation -> all charts drawn: " + ", ".join(f"{t:.3f}" for t in r["load_s"])
                  + f" s; median {statistics.median(r['load_s']):.3f} s (target < 1 s: "
                  + ("MET" if statistics.median(r["load_s"]) < 1 else "MISSED") + ")")
            for path, (cold, warm, size) in r["api"].items():
                print(f"  GET {path}: first {cold:.0f} ms, then median {warm:.0f} ms; {size / 1000:.0f} kB")
        if not args.skip_live:
            r = live_load(tmp, args.window, args.dashboards)
            print(f"live load: {r['windows']} window pairs of {args.window:g} s, search {r['status']}; "
                  f"{r['polls']} dashboard polls, median {r['poll_ms']:.0f} ms each")
            print("  evaluations/s without dashboards: " + ", ".join(f"{x:.2f}" for x in r["rates_off"]))
            print(f"  evaluations/s with {args.dashboards} dashboards: " + ", ".join(f"{x:.2f}" for x in r["rates_on"]))
            print(f"  mean {r['off']:.3f} vs {r['on']:.3f} evaluations/s: ratio {r['ratio']:.3f} (target >= 0.95: "
                  + ("MET" if r["ratio"] >= 0.95 else "MISSED") + f"); median of the window pairs' ratios "
                  f"{r['pair_median']:.3f}")


if __name__ == "__main__":
    main()
