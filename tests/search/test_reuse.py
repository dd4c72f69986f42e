"""Measurements shared across searches (issue 33, docs/reuse.md): real Ray, real SQLite, real
tiny-sd pipelines. Searches run in this process through the driver API (one Ray instance for
the module), on tiny-sd with one prompt and 5 candidate layers (--min-size 60000).

The reference for "reuse gives the same numbers" is the same search on a fresh database,
compared value by value (every baseline, per-layer PSNR, curve point and recipe of the JSON)."""
from __future__ import annotations

import json
import shutil
import sqlite3
from dataclasses import fields

import pytest

from search.config import SearchConfig
from storage.measurement_keys import NOT_VALUE_FIELDS, VALUE_FIELDS, KeySpace

pytestmark = pytest.mark.slow

BASE = dict(min_size=60000, num_recipes=2, prompts=("a red cube on a table",))
# The image gallery after the recipes makes no measurements: off, where this release has it.
QUIET = {"gallery": False} if "gallery" in {f.name for f in fields(SearchConfig)} else {}
BOTH = dict(strategy=("apple", "optimal"), refine_evals=2)


def rows(db, sid: str) -> list[dict]:
    """Every measurement and baseline a search stored, with its reuse columns."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    con.row_factory = sqlite3.Row
    try:
        out = [dict(r) for r in con.execute("SELECT phase, key, reuse_key, reuse_device, reused_from, psnr, "
                                            "per_prompt_json FROM measurements WHERE search_id = ?", (sid,))]
        out += [dict(r) for r in con.execute("SELECT 'baseline' AS phase, name AS key, reuse_key, reuse_device, "
                                             "reused_from, psnr, per_prompt_json FROM baselines WHERE search_id = ?",
                                             (sid,))]
        return out
    finally:
        con.close()


def run(db, model: str = "tiny-sd", **options) -> dict:
    """One whole search in this process (the driver API the CLI uses), kept Ray running."""
    from search.driver.jobs import prepare_search, resolve_config, run_search
    from search.read_models import recipes_json
    from storage import Storage
    from workers.models import resolve_model

    spec = resolve_model(model)
    config = resolve_config(spec, **{**BASE, **options, **QUIET})
    with Storage(db) as st:
        done, driver = run_search(st, prepare_search(st, model, config, spec), workers=1)
        assert done.status == "completed", done.error
        assert driver.evaluations == done.evaluations  # this run measured exactly what it counts
        return dict(id=done.id, evaluations=done.evaluations, reused=done.reused, fingerprint=done.fingerprint,
                    report=json.loads(recipes_json(st, done)), rows=rows(db, done.id),
                    recipes=sum(r.psnr is not None for r in st.recipes(done.id)))


def comparable(report: dict) -> dict:
    """The JSON without what names the run (its id, times, evaluation count)."""
    r = json.loads(json.dumps(report))
    for k in ("search_id", "timings"):
        r["mbp_search"].pop(k)
    return r


@pytest.fixture(scope="module", autouse=True)
def ray_for_module():
    import ray

    yield
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def example(tmp_path_factory, model_cache):
    """--nbits 4,8, then --nbits 2,4,8 --strategy both on the same database; the second again on
    a fresh one."""
    shared, fresh = tmp_path_factory.mktemp("reuse") / "s.db", tmp_path_factory.mktemp("fresh") / "s.db"
    first = run(shared, nbits=(4, 8))
    second = run(shared, nbits=(2, 4, 8), **BOTH)
    alone = run(fresh, nbits=(2, 4, 8), **BOTH)
    return dict(db=shared, first=first, second=second, fresh=alone)


def test_reuse_gives_the_fresh_databases_json_and_halves_the_evaluations(example):
    first, second, fresh = example["first"], example["second"], example["fresh"]
    assert comparable(second["report"]) == comparable(fresh["report"])
    # Value by value, not only through the JSON: every stored number of the reusing search
    # equals the fresh search's number for the same item.
    mine = {(r["phase"], r["key"]): (r["psnr"], r["per_prompt_json"]) for r in second["rows"]}
    theirs = {(r["phase"], r["key"]): (r["psnr"], r["per_prompt_json"]) for r in fresh["rows"]}
    assert mine == theirs
    # Every result was either run or copied; nothing twice.
    reused = [r for r in second["rows"] if r["reused_from"]]
    assert second["reused"] == len(reused) > 0 and second["evaluations"] + second["reused"] == fresh["evaluations"]
    assert {r["reused_from"] for r in reused} == {first["id"]}
    # What was copied is what the first search stored under the same key, bit for bit.
    source = {r["reuse_key"]: (r["psnr"], r["per_prompt_json"]) for r in first["rows"]}
    assert all(source[r["reuse_key"]] == (r["psnr"], r["per_prompt_json"]) for r in reused)
    # The 2-bit measurements are new; every 4- and 8-bit isolated and curve point was copied.
    for r in second["rows"]:
        if r["phase"] in ("isolated", "cumulative"):
            assert bool(r["reused_from"]) == ("/2/" not in r["key"]), r
    assert second["evaluations"] <= fresh["evaluations"] / 2, (second["evaluations"], fresh["evaluations"])
    print(f"\nreuse: second search ran {second['evaluations']} evaluations and reused {second['reused']}; "
          f"the same search on a fresh database ran {fresh['evaluations']}")


def test_status_shows_reused_beside_evaluations(example):
    from typer.testing import CliRunner

    from search.cli.app import app

    sid, db = example["second"]["id"], str(example["db"])
    res = CliRunner().invoke(app, ["status", sid, "--db", db, "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert (info["evaluations"], info["reused"]) == (example["second"]["evaluations"], example["second"]["reused"])
    res = CliRunner().invoke(app, ["status", sid, "--db", db])
    assert res.exit_code == 0, res.output
    assert f"pipeline runs stored {info['evaluations']}, reused {info['reused']};" in " ".join(res.output.split())
    res = CliRunner().invoke(app, ["submit", "--help"])
    assert "--no-reuse" in res.output and "--reuse-across-devices" in res.output


@pytest.mark.parametrize("change", [dict(resolution=32), dict(precision="float16"), dict(reuse=False)],
                         ids=["resolution", "precision", "no-reuse"])
def test_nothing_reused_across_a_protocol_change_or_with_no_reuse(example, tmp_path, change):
    """A copy of the example's database (so the checks stay independent): a search that differs
    in one protocol field, or asks --no-reuse, measures everything itself."""
    from search.submit_options import parse_search_options

    db = tmp_path / "s.db"
    shutil.copy(example["db"], db)  # WAL checkpointed when the storage closed
    shutil.copytree(f"{example['db']}.palettes", f"{db}.palettes")  # palettes do not depend on the protocol
    options = {k: v for k, v in parse_search_options({"nbits": "8", **change}).items() if v is not None}
    got = run(db, **{**options, "num_recipes": 2, "min_size": BASE["min_size"]})
    assert got["reused"] == 0 and not any(r["reused_from"] for r in got["rows"])
    assert got["evaluations"] == len(got["rows"]) + got["recipes"]  # + the recipes, measured end to end
    keys = {r["reuse_key"] for r in got["rows"]}
    before = {r["reuse_key"] for r in example["first"]["rows"]}
    assert all(keys) and len(keys) == len(got["rows"])
    # --no-reuse still stores its keys (the same ones: the values would be reusable); a changed
    # protocol gives keys no earlier search has.
    assert (keys <= before) if change == dict(reuse=False) else not (keys & before)


def test_nothing_reused_across_a_changed_model(tmp_path, tiny_sd_spec):
    """The same local folder before and after one denoiser weight changed: same path (model
    version), another fingerprint, nothing reused."""
    import torch
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "model"
    shutil.copytree(tiny_sd_spec.location, folder)
    db = tmp_path / "s.db"
    small = dict(nbits=(8,), resolution=64)  # a local folder is measured at Apple's 768 px otherwise
    before = run(db, str(folder), **small)
    for weights in (folder / "unet").glob("*.safetensors"):  # every variant the loader may pick
        tensors = load_file(weights)
        name = next(k for k in tensors if k.endswith("conv_in.weight"))
        tensors[name] = tensors[name] * torch.tensor(1.5, dtype=tensors[name].dtype)
        save_file(tensors, weights)
    after = run(db, str(folder), **small)
    assert after["fingerprint"] != before["fingerprint"]
    assert after["reused"] == 0 and after["evaluations"] == len(after["rows"]) + after["recipes"]
    assert not {r["reuse_key"] for r in after["rows"]} & {r["reuse_key"] for r in before["rows"]}


def test_reuse_through_search_serve(example, tmp_path, model_cache):
    """`search serve` on a copy of the example's database: an 8-bit search submitted over HTTP
    copies every measurement and baseline the first search stored for it and runs only its
    recipes; `GET /searches/{id}` shows `reused` beside `evaluations`."""
    import secrets
    import tempfile

    import ray

    from tests.search.test_service import ACTIVE, ServiceProcess, ray_env, wait_for

    if ray.is_initialized():
        ray.shutdown()  # the service starts its own Ray; this module's searches restart theirs
    db = tmp_path / "s.db"
    shutil.copy(example["db"], db)
    shutil.copytree(f"{example['db']}.palettes", f"{db}.palettes")
    raytmp = tempfile.mkdtemp(prefix="mbpru", dir="/tmp")  # short: Ray's socket paths have a length limit
    srv = ServiceProcess(db, ray_env(model_cache, secrets.token_hex(16), tmpdir=raytmp), secrets.token_urlsafe(24),
                         tmp_path / "serve.log")
    try:
        c = srv.start().client()
        body = {"model": "tiny-sd", "nbits": "8", "min_size": BASE["min_size"], "num_recipes": BASE["num_recipes"],
                "prompts": list(BASE["prompts"]), **QUIET}
        r = c.post("/searches", json=body)
        assert r.status_code == 201, r.text
        sid = r.json()["id"]
        d = wait_for(lambda: c.get(f"/searches/{sid}").json(), lambda d: d["status"] not in ACTIVE, 900,
                     "the search to finish", interval=1)
    finally:
        srv.stop()
        shutil.rmtree(raytmp, ignore_errors=True)
    assert d["status"] == "completed", (d, srv.log_tail())
    got = rows(db, sid)
    before = {r["reuse_key"]: (r["psnr"], r["per_prompt_json"]) for r in example["first"]["rows"]}
    assert got and all(r["reused_from"] == example["first"]["id"] for r in got)
    assert all(before[r["reuse_key"]] == (r["psnr"], r["per_prompt_json"]) for r in got)
    measured = sum(r["psnr"] is not None for r in d["recipes"])
    assert (d["reused"], d["evaluations"]) == (len(got), measured)


# -- storage (no model) ---------------------------------------------------------------------
def test_older_database_gains_the_key_columns_and_its_rows_are_never_reused(tmp_path):
    """A database from before the reuse step: migrated in place, its rows keep a NULL key (the dtype
    that measured them is unknown) and no lookup finds them; copies count as reused, once."""
    from sqlalchemy import create_engine

    from storage import Baseline, Measurement, Storage, schema
    from storage.engine import APPLICATION_ID
    from storage.migrations import STEPS, _measurement_reuse
    from storage.reuse_store import copy_results, find_baselines, find_measurements

    path = tmp_path / "old.db"
    engine = create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        schema.Base.metadata.create_all(conn)
        for table, cols in (("measurements", ("reuse_key", "reuse_device", "reused_from")),
                            ("baselines", ("reuse_key", "reuse_device", "reused_from")),
                            ("palettes", ("reuse_key", "reused_from")), ("searches", ("reused",))):
            if table != "searches":
                conn.exec_driver_sql(f"DROP INDEX ix_{table}_reuse_key")
            for col in cols:
                conn.exec_driver_sql(f"ALTER TABLE {table} DROP COLUMN {col}")
        conn.exec_driver_sql(f"PRAGMA user_version={STEPS.index(_measurement_reuse)}")
        conn.exec_driver_sql(f"PRAGMA application_id={APPLICATION_ID}")
        conn.exec_driver_sql("INSERT INTO searches (id, model, model_version, model_location, model_source, "
                             "fingerprint, config_json, config_hash, status, phase, created_at, updated_at, "
                             "evaluations, elapsed_s) VALUES ('old', 'm', 'm', 'm', '', 'f', '{}', 'h', 'completed', "
                             "'done', '2026-01-01', '2026-01-01', 1, 0)")
        conn.exec_driver_sql("INSERT INTO measurements (search_id, key, phase, bits, group_size, layer, psnr, "
                             "per_prompt_json, node, worker, duration_s, created_at) VALUES ('old', 'isolated/4/a', "
                             "'isolated', 4, 0, 'a', 30.0, '[30.0]', 'n', 'w', 1.0, '2026-01-01')")
    engine.dispose()
    with Storage(path) as st:
        assert st.get_search("old").reused == 0 and st.get_search("old").evaluations == 1
        con = sqlite3.connect(path)
        assert con.execute("SELECT reuse_key, reused_from FROM measurements").fetchall() == [(None, None)]
        plan = " ".join(r[-1] for r in con.execute("EXPLAIN QUERY PLAN SELECT id FROM measurements WHERE "
                                                     "reuse_key IN ('a', 'b')"))
        con.close()
        assert "ix_measurements_reuse_key" in plan  # an index lookup, not a scan
        assert find_measurements(st, ["k", None], exclude="x", device=None) == {}
        new = st.create_search(model="m", model_version="m", model_location="m", model_source="", fingerprint="f",
                               config={}, config_hash="h2", layers=[])
        st.add_measurement(new.id, Measurement("isolated/4/a", "isolated", 4, "a", None, 31.0, (31.0,), "n", "w", 1.0,
                                               reuse_key="k", reuse_device="cpu"))
        st.add_baseline(new.id, Baseline("original", 99.0, (99.0,), "n", 1.0, reuse_key="b", reuse_device="cpu"))
        assert find_measurements(st, ["k"], exclude=new.id, device=None) == {}  # a search never takes its own
        assert find_measurements(st, ["k"], exclude="x", device="cuda") == {}  # another device class
        found = find_measurements(st, ["k"], exclude="x", device="cpu")["k"]
        assert (found.source, found.psnr, found.per_prompt, found.device) == (new.id, 31.0, (31.0,), "cpu")
        third = st.create_search(model="m", model_version="m", model_location="m", model_source="", fingerprint="f",
                                 config={}, config_hash="h3", layers=[])
        b = find_baselines(st, ["b"], exclude=third.id, device="cpu")["b"]
        copies = ([Measurement("isolated/4/a", "isolated", 4, "a", None, found.psnr, found.per_prompt, "n", "w", 1.0,
                               reuse_key="k", reuse_device="cpu", reused_from=found.source)],
                  [Baseline("original", b.psnr, b.per_prompt, "n", 1.0, reuse_key="b", reuse_device="cpu",
                            reused_from=b.source)])
        assert copy_results(st, third.id, *copies) == 2 and copy_results(st, third.id, *copies) == 0
        got = st.get_search(third.id)
        assert (got.evaluations, got.reused) == (0, 2) and st.get_search(new.id).evaluations == 2
        assert [m.psnr for m in st.measurements(third.id)] == [31.0] and st.baselines(third.id)["original"].psnr == 99.0


# -- the key itself (pure) ------------------------------------------------------------------
def test_every_config_field_is_decided():
    """A new SearchConfig field must be put in the key or said not to change numbers."""
    names = {f.name for f in fields(SearchConfig)}
    assert names == set(VALUE_FIELDS) | set(NOT_VALUE_FIELDS) and not set(VALUE_FIELDS) & set(NOT_VALUE_FIELDS)


def test_each_value_field_changes_every_key_and_the_others_change_none():
    base = SearchConfig(nbits=(4, 8), prompts=("a",), resolution=64)
    changed = {"protocol": "classic", "prompts": ("b",), "images": ("0" * 64,), "seed": 3, "steps": 2,
               "resolution": 32, "guidance_scale": 2.0, "batch_size": 1, "default_nbits": 8,
               "loras": ("/x.safetensors:1.0",), "config_dir": "/configs"}
    assert set(changed) == set(VALUE_FIELDS)

    def keys(config: dict, **facts) -> tuple:
        space = KeySpace.of(**{**dict(fingerprint="f", model_version="m", config=config, dtype="float32",
                                      candidates=["a", "b"]), **facts})
        return (space.measurement("isolated", layer="a", bits=4, assignment=(("a", 4),)),
                space.measurement("cumulative", assignment=(("a", 4), ("b", 4))),
                space.measurement("baseline", name="original"), space.measurement("floor", layer="a"),
                space.measurement("candidate", assignment=(("a", 4),)))

    ref = keys(base.to_dict())
    for field, value in changed.items():
        other = keys({**base.to_dict(), field: value})
        assert all(a != b for a, b in zip(ref, other)), field
    for facts in (dict(fingerprint="g"), dict(model_version="n"), dict(dtype="float16")):
        assert all(a != b for a, b in zip(ref, keys(base.to_dict(), **facts))), facts
    same = SearchConfig(nbits=(2, 4, 8), prompts=("a",), resolution=64, min_size=5, num_recipes=3,
                        strategy=("apple", "optimal"), refine_evals=5, prefix_reuse=False, reuse=False)
    assert keys(same.to_dict()) == ref
    # A curve point is the set its order palettized so far: the same set in another order is the same run.
    space = KeySpace.of(fingerprint="f", model_version="m", config=base.to_dict(), dtype="float32", candidates=["a"])
    assert space.measurement("cumulative", assignment=(("b", 4), ("a", 4))) == ref[1]
    assert space.measurement("cumulative", assignment=(("a", 8), ("b", 4))) != ref[1]
