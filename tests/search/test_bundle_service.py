"""Bundles through the cluster's ``coreml`` phase and the service: the Core ML worker actor (local
Ray, ``coreml_node any``) builds a recipe's Resources folder for Apple's Swift pipeline, ships its
zip to the head in pieces, and `search download --bundle` (local and through `search serve`'s
HTTP route) unpacks it whole; a second run of the phase builds nothing; the dashboard links it.

One recipe of the session's completed tiny-sdxl search (a copy of its database and palettes, so
other modules see it as it was), one phase run for the module. Independent references: the file
names Apple's Swift pipeline resolves (``StableDiffusionXL+Resources.swift``, written here),
hashlib over the unpacked files, the stored zip and what the route sends, os.stat for sizes.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import time
import zipfile
from pathlib import Path

import pytest

from search.driver.progress import NullReporter
from storage import Storage
from storage.coreml_store import CoreMLStore
from storage.package_store import PackageStore
from tests.coreml_helpers import same_tree, sha256
from tests.service_helpers import serving

pytestmark = pytest.mark.slow

# apple/ml-stable-diffusion swift/StableDiffusion/pipeline/StableDiffusionXL+Resources.swift,
# ResourceURLs(resourcesAt:): what StableDiffusionXLPipeline loads for the base model, unchunked
# (.mlmodelc there; off macOS the same base names as .mlpackage, compiled on a Mac).
SDXL_MODELS = {"TextEncoder", "TextEncoder2", "Unet", "VAEDecoder", "VAEEncoder"}
SDXL_TOKENIZER = {"vocab.json", "merges.txt"}


class Messages(NullReporter):
    """The phase's messages, kept."""

    def __init__(self):
        self.lines = []

    def message(self, text):
        self.lines.append(text)


@pytest.fixture(scope="module")
def shipped(completed_tiny_search, tmp_path_factory):
    """The phase run once for one recipe, its bundle shipped into the package store beside the
    database (where the local `search download` reads it)."""
    import ray

    from search.driver.coreml_phase import CoreMLPhase

    src = Path(completed_tiny_search["db"])
    base = tmp_path_factory.mktemp("bundle-service")
    shutil.copytree(src.parent, base / "data")
    db, sid = base / "data" / src.name, completed_tiny_search["search_id"]
    # the search as built, before any Core ML phase (other modules may have run one on the original)
    shutil.rmtree(PackageStore.beside(db).root, ignore_errors=True)
    with sqlite3.connect(db) as con:
        con.executescript("DELETE FROM coreml_bundles; DELETE FROM coreml_packages; DELETE FROM coreml_jobs; "
                          "DELETE FROM validations;")
    key = sorted(completed_tiny_search["recipes"])[0]
    packages = PackageStore.beside(db)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        with Storage(db) as st:
            CoreMLStore(st).request(sid, key, "any")
            phase = CoreMLPhase(st, st.get_search(sid), packages, reporter=Messages())
            t0 = time.monotonic()
            phase.run()
            seconds = time.monotonic() - t0
            job, bundles = CoreMLStore(st).job(sid), CoreMLStore(st).bundles(sid)
        print(f"\nphase (1 package + 1 bundle of tiny-sdxl): {seconds:.1f} s; bundle {phase.bundle_bytes / 1e6:.2f} MB "
              f"shipped in {phase.bundle_ship_s:.2f} s")
        yield dict(db=db, sid=sid, key=key, packages=packages, phase=phase, job=job, bundles=bundles, base=base)
    finally:
        ray.shutdown()


def test_the_phase_ships_a_bundle_with_apples_names_and_checked_files(shipped, tmp_path):
    from typer.testing import CliRunner

    from search.cli.app import app

    key, sid, db = shipped["key"], shipped["sid"], shipped["db"]
    assert shipped["job"].status == "completed", shipped["job"]
    assert shipped["phase"].bundles_built == 1
    b = shipped["bundles"][key]
    stored = shipped["packages"].path(b.path)
    assert b.status == "shipped" and stored.name == f"{key}.bundle.zip", b
    assert stored.stat().st_size == b.zip_bytes == shipped["phase"].bundle_bytes and sha256(stored) == b.sha256
    t0 = time.monotonic()
    res = CliRunner().invoke(app, ["download", sid, "--bundle", key, "-o", str(tmp_path), "--db", str(db)])
    assert res.exit_code == 0, res.output
    folder = tmp_path / key
    print(f"\nlocal download and unpack: {time.monotonic() - t0:.2f} s; {b.total_bytes / 1e6:.2f} MB folder, "
          f"{b.zip_bytes / 1e6:.2f} MB zip")
    top = {p.name for p in folder.iterdir()}
    assert {f"{m}.mlpackage" for m in SDXL_MODELS} | SDXL_TOKENIZER | {"bundle.json"} <= top, top
    assert top - {f"{m}.mlpackage" for m in SDXL_MODELS} - SDXL_TOKENIZER - {"bundle.json"} <= {"README.txt"}, top
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial zip or temp folder left
    manifest = json.loads((folder / "bundle.json").read_text())
    files = {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file()}
    listed = {f["path"]: f for f in manifest["files"]}
    assert set(listed) == set(files) - {"bundle.json"}
    for path, f in listed.items():
        assert f["sha256"] == hashlib.sha256(files[path].read_bytes()).hexdigest(), path
        assert f["bytes"] == files[path].stat().st_size, path
    total = sum(files[p].stat().st_size for p in listed)
    assert manifest["total_bytes"] == total == b.total_bytes
    assert (manifest["recipe_key"], manifest["search_id"], manifest["family"]) == (key, sid, "sdxl")
    with zipfile.ZipFile(stored) as zf:  # the zip's one folder is Resources/, as Swift's resourcesAt: takes it
        assert {n.split("/")[0] for n in zf.namelist()} == {"Resources"}


def test_a_second_run_builds_nothing(shipped):
    from search.driver.coreml_phase import CoreMLPhase
    from workers.coreml.shipping import node_out_dir

    sid, key, packages = shipped["sid"], shipped["key"], shipped["packages"]
    node_zip = node_out_dir(sid) / "bundles" / f"{key}.bundle.zip"  # the node's own copy (same machine here)
    stored = packages.path(shipped["bundles"][key].path)
    before = (node_zip.stat().st_mtime_ns, stored.stat().st_mtime_ns)
    with Storage(shipped["db"]) as st:
        CoreMLStore(st).request(sid, key, "any")
        again = CoreMLPhase(st, st.get_search(sid), packages)
        t0 = time.monotonic()
        again.run()
        print(f"\nsecond run: {time.monotonic() - t0:.2f} s")
        assert CoreMLStore(st).job(sid).status == "completed"
        assert CoreMLStore(st).bundles(sid) == shipped["bundles"]
    assert again.bundles_built == 0 and again.bundle_bytes == again.shipped_bytes == 0
    assert (node_zip.stat().st_mtime_ns, stored.stat().st_mtime_ns) == before


def test_a_bad_bundle_key_is_one_line_and_exit_2(shipped, tmp_path):
    from typer.testing import CliRunner

    from search.cli.app import app

    res = CliRunner().invoke(app, ["download", shipped["sid"], "--bundle", "nope", "-o", str(tmp_path / "o"),
                                   "--db", str(shipped["db"])])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "no shipped bundle for recipe 'nope'" in lines[0] and shipped["key"] in lines[0], lines
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def server(shipped, tmp_path_factory):
    """`search serve`'s app (uvicorn on a free loopback port, in a thread) over the same database;
    its package store is the one the phase shipped into."""
    from search.service.app import create_app

    data = tmp_path_factory.mktemp("service-data")
    (data / "packages").symlink_to(shipped["packages"].root, target_is_directory=True)
    app = create_app(shipped["db"], data, resume_interrupted=False)
    with serving(app) as url:
        yield url


def test_the_service_route_and_the_remote_download(shipped, server, tmp_path):
    import httpx
    from typer.testing import CliRunner

    from search.cli.app import app
    from search.service.client import Client

    sid, key, b = shipped["sid"], shipped["key"], shipped["bundles"][shipped["key"]]
    stored = shipped["packages"].path(b.path).read_bytes()
    with httpx.Client(base_url=server, timeout=60) as c:
        status = c.get(f"/searches/{sid}/coreml").json()
        assert status["bundles"][key]["zip_bytes"] == len(stored) and status["bundles"][key]["sha256"] == b.sha256
        assert status["bundles"][key]["total_bytes"] == b.total_bytes and "path" not in status["bundles"][key]
        whole = c.get(f"/searches/{sid}/coreml/{key}.bundle.zip")
        assert whole.status_code == 200 and whole.content == stored
        assert whole.headers["x-checksum-sha256"] == hashlib.sha256(stored).hexdigest()
        part = c.get(f"/searches/{sid}/coreml/{key}.bundle.zip", headers={"Range": "bytes=1000-"})
        assert part.status_code == 206 and part.content == stored[1000:]
        missing = c.get(f"/searches/{sid}/coreml/nope.bundle.zip")
        assert missing.status_code == 404 and "no bundle for recipe 'nope'" in missing.json()["detail"]
        assert c.get(f"/searches/{sid}").json()["bundles"][key]["total_bytes"] == b.total_bytes
    # an interrupted download resumes from where it stopped (a Range request)
    partial = tmp_path / "partial.zip"
    partial.write_bytes(stored[:12345])
    with Client(server) as client, open(partial, "ab") as fh:
        client.download_package(sid, key, fh, "bundle")
    assert partial.read_bytes() == stored
    runner = CliRunner()
    t0 = time.monotonic()
    res = runner.invoke(app, ["download", sid, "--bundle", "all", "-o", str(tmp_path / "remote"), "--server", server])
    assert res.exit_code == 0, res.output
    t_dl = time.monotonic() - t0
    res = runner.invoke(app, ["download", sid, "--bundle", key, "-o", str(tmp_path / "local"),
                              "--db", str(shipped["db"])])
    assert res.exit_code == 0, res.output
    assert same_tree(tmp_path / "remote" / key, tmp_path / "local" / key)
    with zipfile.ZipFile(shipped["packages"].path(b.path)) as zf:  # and both are the zip's files
        assert {n.removeprefix("Resources/"): zf.read(n) for n in zf.namelist()} == {
            p.relative_to(tmp_path / "remote" / key).as_posix(): p.read_bytes()
            for p in (tmp_path / "remote" / key).rglob("*") if p.is_file()}
    print(f"\nremote download of {len(stored) / 1e6:.2f} MB through the HTTP route: {t_dl:.2f} s")
    res = runner.invoke(app, ["download", sid, "--bundle", "nope", "-o", str(tmp_path / "x"), "--server", server])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output
    res = runner.invoke(app, ["status", sid, "--server", server])
    assert res.exit_code == 0, res.output
    assert f"bundle {key}: shipped, {b.total_bytes / 1e6:.2f} MB" in " ".join(res.output.split()), res.output


def test_the_dashboard_links_the_bundle_with_its_size(shipped, server):
    """The search page lists the shipped bundle with its total size; the link downloads the stored zip."""
    chromium = Path(os.environ.get("MBP_TEST_CHROMIUM", "/usr/bin/chromium"))
    try:
        import playwright.sync_api as playwright_api
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[test]')")
    if not chromium.exists():
        pytest.skip(f"no Chromium at {chromium}")
    sid, key, b = shipped["sid"], shipped["key"], shipped["bundles"][shipped["key"]]
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium), headless=True,
                                    args=["--headless", "--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_context(accept_downloads=True).new_page()
            page.set_default_timeout(30_000)
            page.goto(f"{server}/#/search/{sid}")
            link = page.wait_for_selector(f'a[data-dl="/searches/{sid}/coreml/{key}.bundle.zip"]')
            assert f"recipe {key}: {b.total_bytes / 1e6:.2f} MB" in link.inner_text(), link.inner_text()
            with page.expect_download() as dl:
                link.click()
            got = Path(dl.value.path()).read_bytes()
            assert got == shipped["packages"].path(b.path).read_bytes()
            assert dl.value.suggested_filename == f"{sid}-{key}.bundle.zip"
        finally:
            browser.close()


def test_flux_gets_no_bundle_and_one_note(tmp_path, model_cache):
    """A family without a Swift pipeline: the phase completes with one note and no bundle row; its
    packages (stored here as shipped and validated) are the result, and no worker is started."""
    from search.driver.coreml_phase import CoreMLPhase
    from storage import StoredRecipe, Validation
    from storage.records import PackageInfo
    from workers.models import resolve_model

    spec = resolve_model("tiny-flux", model_cache)
    db = tmp_path / "s.db"
    packages = PackageStore.beside(db)
    with Storage(db) as st:
        s = st.create_search(model="tiny-flux", model_version="tiny-flux", model_location=spec.location,
                             model_source="builtin", fingerprint="f" * 64, config={"nbits": [4]}, config_hash="c" * 64,
                             layers=[])
        st.add_recipe(s.id, StoredRecipe("k", "apple", None, None, {}, 16.0, 1.0, None, 40.0, None, None, None))
        st.put_validation(s.id, Validation("k", "/n/k.mlpackage", 10, 16.0, True, "ok", 40.0, True, None, "not run",
                                           "n"))
        path = packages.path(packages.relative_path(s.id, "k"))
        path.parent.mkdir(parents=True)
        path.write_bytes(b"z" * 10)
        CoreMLStore(st).put_package(s.id, PackageInfo("k", "shipped", "", packages.relative_path(s.id, "k"), 10,
                                                      hashlib.sha256(b"z" * 10).hexdigest(), "n", 0.1))
        CoreMLStore(st).request(s.id, "all", "any")
        messages = Messages()
        phase = CoreMLPhase(st, st.get_search(s.id), packages, spec=spec, reporter=messages)
        phase.run()
        assert CoreMLStore(st).job(s.id).status == "completed" and CoreMLStore(st).bundles(s.id) == {}
    notes = [m for m in messages.lines if "Swift" in m]
    assert phase.bundles_built == 0 and len(notes) == 1, messages.lines
    assert notes[0].startswith("flux models have no pipeline in Apple's Swift package"), notes
