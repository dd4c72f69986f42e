"""Issue 36 through the service for a search submitted for Core ML (its config has no ``target``):
`search apply ID --target coreai --server URL` asks a real `search serve` (its own Ray) to run the
Core ML phase with target coreai (node ``any`` by default), and `search download ID --bundle all`
fetches the Core AI folders it shipped.

One finished tiny-sd search (one prompt) with two recipes: one of 1/2/4/6-bit layers, built, and
one with 3-bit layers, refused in one line (Core AI packs 1/2/4/6/8 bits) while the other builds.
Independent references: the recipe's PSNR measured by the Evaluator when the search was built
(`build_completed_search`), the downloaded folder's own mbp-coreai.json compared field by field
with the stored row, hashlib over the stored zip.
"""
from __future__ import annotations

import hashlib
import json
import secrets
import shutil
import tempfile
import time

import pytest

from storage import Storage
from storage.coreai_store import CoreAIStore
from tests.conftest import build_completed_search
from tests.search.test_service import ServiceProcess, ray_env, wait_for
from workers import coreai

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not coreai.available(), reason=coreai.INSTALL_HINT)]

CHECKS = ("luts_ok", "luts_detail", "runtime_psnr", "measured_psnr", "runtime_ok", "runtime_detail", "comparison")


@pytest.fixture(scope="module")
def applied(model_cache, tmp_path_factory):
    """The search built, `search serve` started on it, `search apply --target coreai --server` run
    and waited for; yields what the tests read."""
    from typer.testing import CliRunner

    from common.formats import PaletteFormat
    from search.cli.app import app
    from workers.models import resolve_model

    base = tmp_path_factory.mktemp("coreai-apply")
    db = base / "searches.db"
    t0 = time.monotonic()
    built = build_completed_search(resolve_model("tiny-sd"), "tiny-sd", db, prompts=1, with_8bit=False,
                                   cycles=((4, 16, 2, 16, 6, 16, 1, 16), (3, 16, 4, 16)))
    good, = [k for k, (bits, _) in built["recipes"].items()
             if 3 not in {PaletteFormat.of(b).bits for b in bits.values()}]
    three, = [k for k in built["recipes"] if k != good]
    raytmp = tempfile.mkdtemp(prefix="mbpca", dir="/tmp")  # short: Ray's socket paths have a length limit
    srv = ServiceProcess(db, ray_env(model_cache, secrets.token_hex(16), tmpdir=raytmp), secrets.token_urlsafe(24),
                         base / "serve.log")
    try:
        srv.start()
        t1 = time.monotonic()
        sid = built["search_id"]
        res = CliRunner().invoke(app, ["apply", sid, "--target", "coreai", "--no-compare-4bit", "--server", srv.url,
                                       "--token", srv.token])  # the 4bit table: tests/search/test_coreai_service.py
        assert res.exit_code == 0, res.output
        with srv.client() as client:
            view = wait_for(lambda: client.get(f"/searches/{sid}/coreml").json(),
                            lambda v: v["coreml"]["status"] in ("completed", "failed"), 300,
                            "the Core AI phase", interval=1.0)
        t2 = time.monotonic()
        out = base / "download"
        dl = CliRunner().invoke(app, ["download", sid, "--bundle", "all", "-o", str(out), "--server", srv.url,
                                      "--token", srv.token])
        refused = CliRunner().invoke(app, ["download", sid, "--bundle", three, "-o", str(base / "x"),
                                           "--server", srv.url, "--token", srv.token])
        print(f"\nsearch built {t1 - t0:.1f} s (with `search serve` started); apply --target coreai through the "
              f"service {t2 - t1:.1f} s; download {time.monotonic() - t2:.1f} s")
        with Storage(db) as st:
            rows = CoreAIStore(st).bundles(sid)
        yield dict(built=built, sid=sid, good=good, three=three, apply_output=res.output, view=view, rows=rows,
                   download=dl, refused=refused, out=out, db=db, base=base)
    finally:
        srv.stop()
        shutil.rmtree(raytmp, ignore_errors=True)


def test_apply_target_coreai_through_the_service_ships_a_checked_folder(applied):
    sid, good = applied["sid"], applied["good"]
    cm = applied["view"]["coreml"]
    assert "Core AI phase started" in applied["apply_output"], applied["apply_output"]
    assert (cm["status"], cm["target"], cm["coreml_node"]) == ("completed", "coreai", "any"), cm
    assert applied["download"].exit_code == 0, applied["download"].output
    folder = applied["out"] / good
    report = json.loads((folder / "mbp-coreai.json").read_text())
    assert (report["search_id"], report["recipe_key"]) == (sid, good)
    row = applied["rows"][good]
    assert row.status == "shipped" and row.ok and row.luts_ok is True and row.runtime_ok is True
    assert row.comparison is None  # --no-compare-4bit went through the service to the worker
    assert {k: getattr(row, k) for k in CHECKS} == {k: report[k] for k in CHECKS}  # stored = the folder's own
    _, measured = applied["built"]["recipes"][good]
    assert report["measured_psnr"] == pytest.approx(measured)  # the PSNR the search measured
    assert abs(report["runtime_psnr"] - measured) <= 0.15
    stored, = applied["base"].rglob(f"{good}.coreai.zip")  # in the service's package store
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == row.sha256 and stored.stat().st_size == row.zip_bytes
    assert sorted(p.name for p in applied["out"].iterdir()) == [good]  # only the shipped one, no partial left


def test_a_3bit_recipe_is_refused_in_one_line_and_the_other_builds(applied):
    three = applied["three"]
    row = applied["rows"][three]
    assert row.status == "failed" and row.path is None and row.zip_bytes == 0
    assert "\n" not in row.detail and "3-bit" in row.detail and "Core AI" in row.detail, row.detail
    assert applied["rows"][applied["good"]].status == "shipped"
    res = applied["refused"]
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output
    assert f"no shipped Core AI folder for recipe '{three}'" in res.output and "3-bit" in res.output
    assert not (applied["base"] / "x").exists()


def test_flags_of_core_ml_packages_are_refused_with_target_coreai(applied):
    from typer.testing import CliRunner

    from search.cli.app import app

    for args, line in ((["--here", "--server", "http://127.0.0.1:9"], "--here apply to Core ML packages only"),
                       (["--target", "tflite"], "--target must be one of coreml, coreai"),
                       (["--no-compare-4bit", "-o", "x"], "--no-compare-4bit applies to --target coreai only")):
        args = ["--target", "coreai", *args] if "--here" in args else args
        res = CliRunner().invoke(app, ["apply", applied["sid"], *args, "--db", str(applied["db"])])
        assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1 and line in res.output, res.output
