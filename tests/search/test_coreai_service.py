"""Core AI folders through the Core ML phase and the service (issue 36), on one finished tiny-sd
search (one recipe, one prompt) whose config says ``target: coreai`` (what `search submit --target
coreai` stores):

- `search bundle --target coreai` (its driver function) builds the folder locally and stores one
  row whose checks are the ones its own mbp-coreai.json reports (value by value);
- the phase (the Core ML phase's worker actor on local Ray, node ``any``) builds the same recipe,
  ships its zip into the package store, and `search download --bundle` through `search serve`'s
  HTTP route and locally both unpack the same bytes, equal file by file (hashlib) to the local
  build; an asset's program is compared as Core AI prints it with each weight blob named by the
  sha256 of its bytes (Core AI seeds blob names per process: two exports never share bytes), the
  metadata without dates; its stored checks are the runtime's (the downloaded mbp-coreai.json);
- `search status` (text and --json, local and remote) shows the checks and the 4bit table;
- 3-bit formats with --target coreai are refused in one line (exit 2, nothing stored), without the
  packages --target coreai says how to install them, and a database from before this table gains it.
"""
from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import time
from pathlib import Path

import pytest

from storage import Storage
from storage.coreai_store import CoreAIStore
from tests.cli_helpers import error_line, run_cli
from tests.conftest import build_completed_search
from tests.service_helpers import serving
from workers import coreai

needs_coreai = pytest.mark.skipif(not coreai.available(), reason=coreai.INSTALL_HINT)
slow = pytest.mark.slow  # the three tests on the built folders: a Ray phase and two Core AI builds


def _files(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def search(model_cache, tmp_path_factory):
    from workers.models import resolve_model

    db = tmp_path_factory.mktemp("coreai-service") / "data" / "searches.db"
    db.parent.mkdir()
    built = build_completed_search(resolve_model("tiny-sd"), "tiny-sd", db, cycles=((4, 16, 2, 16, 6, 16, 1, 16),),
                                   prompts=1, with_8bit=False)
    with sqlite3.connect(db) as con:  # what `search submit --target coreai` stores in the config
        (text,), = con.execute("SELECT config_json FROM searches WHERE id = ?", (built["search_id"],)).fetchall()
        con.execute("UPDATE searches SET config_json = ? WHERE id = ?",
                    (json.dumps({**json.loads(text), "target": "coreai"}), built["search_id"]))
    key, = built["recipes"]
    return {**built, "key": key}


@pytest.fixture(scope="module")
def local(search, model_cache, tmp_path_factory):
    """`search bundle --target coreai --no-compare-4bit` once (its driver function, in this process:
    the CLI around it is tests/search/test_coreai_bundle.py's); its stored row read before the
    phase replaces it."""
    from search.driver.bundle_jobs import bundle_coreai

    folder = tmp_path_factory.mktemp("coreai-local") / "sd-coreai"
    t0 = time.monotonic()
    with Storage(search["db"]) as st:
        report = bundle_coreai(st, search["search_id"], recipe=None, out_dir=folder, compare_4bit=False)
        row = CoreAIStore(st).bundles(search["search_id"])[search["key"]]
    print(f"\nlocal `search bundle --target coreai` (tiny-sd, 1 prompt, no 4bit table): {time.monotonic() - t0:.1f} s")
    return {"folder": folder, "result": report.result, "row": row}


@pytest.fixture(scope="module")
def shipped(search, local):
    """The Core ML phase of the search (its target: coreai) run once on local Ray, node any."""
    import ray

    from search.driver.coreml_phase import CoreMLPhase
    from search.driver.progress import NullReporter
    from storage.coreml_store import CoreMLStore
    from storage.package_store import PackageStore

    packages = PackageStore.beside(search["db"])
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        with Storage(search["db"]) as st:
            CoreMLStore(st).request(search["search_id"], "all", "any")
            phase = CoreMLPhase(st, st.get_search(search["search_id"]), packages, reporter=NullReporter())
            t0 = time.monotonic()
            phase.run()
            seconds = time.monotonic() - t0
            job = CoreMLStore(st).job(search["search_id"])
            row = CoreAIStore(st).bundles(search["search_id"])[search["key"]]
            again = time.monotonic()
            CoreMLStore(st).request(search["search_id"], "all", "any")
            CoreMLPhase(st, st.get_search(search["search_id"]), packages, reporter=NullReporter()).run()
            again = time.monotonic() - again
    finally:
        ray.shutdown()
    print(f"\nphase (1 Core AI folder of tiny-sd, with the 4bit table): {seconds:.1f} s, "
          f"{row.zip_bytes / 1e6:.2f} MB zip; a second run {again:.1f} s")
    return {"job": job, "row": row, "packages": packages, "phase": phase, "again_s": again}


@pytest.fixture(scope="module")
def server(search, shipped, tmp_path_factory):
    from search.service.app import create_app

    data = tmp_path_factory.mktemp("coreai-service-data")
    (data / "packages").symlink_to(shipped["packages"].root, target_is_directory=True)
    app = create_app(search["db"], data, resume_interrupted=False)
    with serving(app) as url:
        yield url


def _checks(r: dict) -> dict:
    """The checks as mbp-coreai.json has them."""
    return {k: r[k] for k in ("luts_ok", "luts_detail", "runtime_psnr", "measured_psnr", "runtime_ok",
                              "runtime_detail", "comparison")}


def _row_checks(row) -> dict:
    return {"luts_ok": row.luts_ok, "luts_detail": row.luts_detail, "runtime_psnr": row.runtime_psnr,
            "measured_psnr": row.measured_psnr, "runtime_ok": row.runtime_ok, "runtime_detail": row.runtime_detail,
            "comparison": row.comparison}


_BLOB = re.compile(r'(resource_\d+)\s*:\s*"0x([0-9A-Fa-f]+)"')
_UNIQUIFIER = re.compile(r"@([A-Za-z_][\w$.]*)_[a-z0-9]{8,}(?![\w$.])")


def program_digest(asset: Path) -> str:
    """sha256 of an asset's program as Core AI prints it, each weight blob named by the sha256 of
    its bytes and symbol uniquifiers dropped: Core AI names blobs with a per-process seed and
    uniquifies symbols per conversion (coreai_torch.debugging.graph_match says so), so two exports
    of the same weights in two processes differ in those names, and only in those."""
    from coreai.authoring import AIModelAsset

    module = AIModelAsset.load(str(asset)).program._module._mlir_module  # noqa: SLF001
    body, _, trailer = module.operation.get_asm(large_elements_limit=None).rpartition("dialect_resources:")
    blobs = {name: hashlib.sha256(payload.encode()).hexdigest() for name, payload in _BLOB.findall(trailer)}
    assert blobs or "dense_resource" not in body
    body = re.sub(r"resource_\d+", lambda m: "blob_" + blobs[m.group(0)], body)
    return hashlib.sha256((_UNIQUIFIER.sub(r"@\1_", body) + "".join(sorted(blobs.values()))).encode()).hexdigest()


def same_folder(a: Path, b: Path) -> list[str]:
    """Compare two Core AI folders file by file (sha256); an asset's main.mlirb by `program_digest`
    (its main.hash checked against its bytes on each side), the metadata.json files without the
    build's date and the folder's name. Returns the files compared by their bytes."""
    fa, fb = _files(a), _files(b)
    assert set(fa) == set(fb)
    same_bytes = []
    for name in fa:
        if name.endswith("/main.mlirb"):
            for d in (a, b):
                mlirb = (d / name).read_bytes()
                assert (d / name).with_name("main.hash").read_bytes() == hashlib.sha256(mlirb).digest()
            assert program_digest((a / name).parent) == program_digest((b / name).parent), name
        elif name.endswith("/main.hash") or name == "mbp-coreai.json":
            continue  # main.hash: checked above; mbp-coreai.json: by the tests, field by field
        elif name.endswith("metadata.json"):
            ma, mb = (json.loads((d / name).read_text()) for d in (a, b))
            for m in (ma, mb):
                m.pop("name", None)
                m.pop("creationDate", None)  # Core AI stamps each asset when saved
                (m.get("compilation") or {}).pop("date", None)
            assert ma == mb, name
        else:
            assert fa[name] == fb[name], name
            same_bytes.append(name)
    return same_bytes


@slow
@needs_coreai
def test_the_local_bundle_stores_the_checks_it_reports(search, local):
    row, result = local["row"], local["result"]
    on_disk = json.loads((local["folder"] / "mbp-coreai.json").read_text())
    assert row.status == "built" and row.path == str(local["folder"].resolve()) and row.total_bytes == result.total_bytes
    assert _row_checks(row) == _checks(on_disk) == _checks(vars(result))
    (_, measured), = search["recipes"].values()
    assert row.measured_psnr == pytest.approx(measured) and row.comparison is None
    assert row.difference_db == result.runtime_psnr - measured and abs(row.difference_db) <= 0.15
    assert row.luts_ok is True and row.runtime_ok is True and row.ok is True


@slow
@needs_coreai
def test_the_phase_ships_the_same_folder_and_the_service_serves_it(search, local, shipped, server, tmp_path):
    from typer.testing import CliRunner

    from search.cli.app import app

    row, job = shipped["row"], shipped["job"]
    assert job.status == "completed" and row.status == "shipped" and row.ok
    zip_path = shipped["packages"].path(row.path)
    assert zip_path.name == f"{search['key']}.coreai.zip" and zip_path.stat().st_size == row.zip_bytes
    assert hashlib.sha256(zip_path.read_bytes()).hexdigest() == row.sha256
    assert shipped["phase"].bundles_built == 1 and shipped["again_s"] < 30  # the second run built nothing
    runner = CliRunner()
    res = runner.invoke(app, ["download", search["search_id"], "--bundle", "all", "-o", str(tmp_path / "remote"),
                              "--server", server])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["download", search["search_id"], "--bundle", search["key"], "-o",
                              str(tmp_path / "here"), "--db", str(search["db"])])
    assert res.exit_code == 0, res.output
    remote, here, built = tmp_path / "remote" / search["key"], tmp_path / "here" / search["key"], local["folder"]
    assert _files(remote) == _files(here)  # both downloads: the same bytes
    same = same_folder(remote, built)  # and the folder `search bundle --target coreai` builds
    assert len(same) >= 2 and any(n.startswith("tokenizer/") for n in same), same
    rep_r, rep_b = (json.loads((d / "mbp-coreai.json").read_text()) for d in (remote, built))
    assert {**_checks(rep_r), "comparison": None} == _checks(rep_b)  # the same checks, to the last digit
    assert (rep_r["search_id"], rep_r["recipe_key"]) == (search["search_id"], search["key"])
    assert _row_checks(row) == _checks(rep_r)  # stored = what the runtime gave
    comp = row.comparison
    assert [r["name"] for r in comp["rows"]] == [f"recipe {search['key']}", "Apple 4bit preset"]
    assert comp["delta_db"] == comp["rows"][0]["psnr"] - comp["rows"][1]["psnr"]
    assert comp["rows"][0]["psnr"] == row.runtime_psnr
    assert comp["rows"][0]["asset_bytes"] == sum(p.stat().st_size for p in (remote / "Unet.aimodel").iterdir())
    res = runner.invoke(app, ["download", search["search_id"], "--bundle", "nope", "-o", str(tmp_path / "x"),
                              "--server", server])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output
    assert "no shipped Core AI folder for recipe 'nope'" in res.output and not (tmp_path / "x").exists()


@slow
@needs_coreai
def test_status_shows_the_checks_and_the_4bit_table(search, shipped, server):
    from typer.testing import CliRunner

    from search.cli.app import app

    row, key = shipped["row"], search["key"]
    runner = CliRunner()
    for where in (["--server", server], ["--db", str(search["db"])]):
        res = runner.invoke(app, ["status", search["search_id"], "--json", *where])
        assert res.exit_code == 0, res.output
        c = json.loads(res.output)["coreai"][key]
        assert (c["status"], c["ok"], c["luts_ok"], c["runtime_ok"]) == ("shipped", True, True, True)
        assert (c["runtime_psnr"], c["measured_psnr"]) == (row.runtime_psnr, row.measured_psnr)
        assert c["difference_db"] == row.runtime_psnr - row.measured_psnr
        assert c["comparison"]["delta_db"] == row.comparison["delta_db"]
        assert c["comparison"]["rows"] == [{k: r[k] for k in ("name", "bits_per_weight", "asset_bytes", "psnr")}
                                           for r in row.comparison["rows"]]
        assert "path" not in c
        res = runner.invoke(app, ["status", search["search_id"], *where])
        assert res.exit_code == 0, res.output
        text = " ".join(res.output.split())
        assert (f"Core AI {key}: shipped, {row.total_bytes / 1e6:.2f} MB, a {row.zip_bytes / 1e6:.2f} MB zip on the "
                f"service; LUTs bit for bit yes; runtime PSNR {row.runtime_psnr:.2f} dB vs measured "
                f"{row.measured_psnr:.2f} dB ({row.runtime_psnr - row.measured_psnr:+.2f} dB); ok") in text, text
        for r in row.comparison["rows"]:
            assert f"{r['bits_per_weight']:7.3f} bits/weight".strip() in text and f"{r['psnr']:.2f} dB" in text
        assert f"recipe - Apple 4bit: {row.comparison['delta_db']:+.2f} dB" in text
        assert "Core AI phase completed" in text and "Core ML phase" not in text


@slow
@needs_coreai
def test_the_dashboard_shows_the_checks_and_links_the_zip(search, shipped, server):
    import os

    chromium = Path(os.environ.get("MBP_TEST_CHROMIUM", "/usr/bin/chromium"))
    try:
        import playwright.sync_api as playwright_api
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[test]')")
    if not chromium.exists():
        pytest.skip(f"no Chromium at {chromium}")
    sid, key, row = search["search_id"], search["key"], shipped["row"]
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium), headless=True,
                                    args=["--headless", "--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_context(accept_downloads=True).new_page()
            page.set_default_timeout(30_000)
            page.goto(f"{server}/#/search/{sid}")
            cells = page.wait_for_selector(f'#coreai-table tr[data-coreai="{key}"]').inner_text().split("\t")
            assert [c.strip() for c in cells[:6]] == [
                key, "shipped", "yes", f"{row.runtime_psnr:.2f}",
                f"{row.measured_psnr:.2f} ({row.difference_db:+.2f})", "ok"], cells
            table = page.inner_text("#coreai-table")
            for r in row.comparison["rows"]:
                assert f"{r['bits_per_weight']:.3f}" in table and f"{r['psnr']:.2f}" in table, table
            link = page.wait_for_selector(f'a[data-dl="/searches/{sid}/coreml/{key}.coreai.zip"]')
            with page.expect_download() as dl:
                link.click()
            assert Path(dl.value.path()).read_bytes() == shipped["packages"].path(row.path).read_bytes()
        finally:
            browser.close()


def test_3bit_with_target_coreai_is_refused_in_one_line(tmp_path, model_cache):
    from typer.testing import CliRunner

    from common.formats import PaletteFormat
    from search.cli.app import app
    from search.config import ConfigError
    from search.submit_options import parse_search_options

    proc = run_cli("submit", "--model", "tiny-sd", "--target", "coreai", "--formats", "3g16,4", "--db",
                   tmp_path / "s.db", model_cache=model_cache, timeout=120)  # as a user runs it
    line = error_line(proc)
    assert proc.returncode == 2 and "--target coreai cannot use 3-bit formats (3g16)" in line and "1, 2, 4, 6 and 8" in line
    res = CliRunner().invoke(app, ["submit", "--model", "tiny-sd", "--target", "coreai", "--formats", "2,3,4",
                                   "--db", str(tmp_path / "s.db")])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1 and "3-bit formats (3)" in res.output
    assert not (tmp_path / "s.db").exists()
    assert 3 not in [PaletteFormat.of(f).bits for f in parse_search_options({"target": "coreai"})["nbits"]]
    assert [PaletteFormat.of(f).bits for f in parse_search_options({"formats": "2,3,4"})["nbits"]] == [2, 3, 4]
    with pytest.raises(ConfigError, match="3-bit"):
        parse_search_options({"target": "coreai", "formats": [3, 4]})  # the service's JSON body
    with pytest.raises(ConfigError, match="--target must be one of coreml, coreai"):
        parse_search_options({"target": "tflite"})


def test_target_coreai_without_the_packages_says_how_to_install(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from search.cli.app import app

    monkeypatch.setattr(coreai, "available", lambda: False)
    res = CliRunner().invoke(app, ["submit", "--model", "tiny-sd", "--target", "coreai", "--db",
                                   str(tmp_path / "s.db")])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output
    assert "pip install coreai-torch" in res.output and not (tmp_path / "s.db").exists()


def test_an_older_database_gains_the_coreai_table(tmp_path):
    from storage import migrations
    from storage.coreai_store import CoreAIBundleInfo
    from tests.storage.test_storage import _m, _new

    path = tmp_path / "old.db"
    with Storage(path) as st:
        sid = _new(st).id
        st.add_measurement(sid, _m("isolated/4/down.0.conv"))
    before = migrations.STEPS.index(migrations._coreai_bundles)
    con = sqlite3.connect(path)
    con.executescript(f"DROP TABLE coreai_bundles; PRAGMA user_version={before};")
    con.close()
    with Storage(path) as st:
        assert [m.key for m in st.measurements(sid)] == ["isolated/4/down.0.conv"]
        store = CoreAIStore(st)
        assert store.bundles(sid) == {}
        info = CoreAIBundleInfo("k", "built", "d", "/x", 10, "", 0, True, "ok", 41.5, 41.4, True, "r",
                                {"rows": [], "delta_db": 1.0, "weights": 3}, "n", 1.0)
        store.put(sid, info)
        assert store.bundles(sid) == {"k": info}
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA user_version").fetchone()[0] == migrations.LATEST_VERSION
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()
