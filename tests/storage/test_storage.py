"""Storage through real SQLite: schema versions, uniqueness, refusal of foreign files, concurrency."""
import hashlib
import multiprocessing as mp
import sqlite3

import pytest

from storage import Baseline, Layer, Measurement, PaletteInfo, Storage, StorageError, StoredRecipe
from storage.migrations import LATEST_VERSION

LAYERS = [Layer("down.0.conv", 4096, (64, 64, 1, 1), "conv"), Layer("mid.attn.to_q", 8192, (128, 64), "linear")]


def _new(storage: Storage, model="tiny-sdxl", config_hash="c" * 64):
    return storage.create_search(model=model, model_version=model, model_location="/m", model_source="builtin",
                                 fingerprint="f" * 64, config={"nbits": [4, 8]}, config_hash=config_hash,
                                 layers=LAYERS, owner="test:1")


def _m(key, psnr=50.0, phase="isolated", bits=4, layer="down.0.conv", position=None):
    return Measurement(key, phase, bits, layer, position, psnr, (psnr - 1, psnr + 1), "node", "w", 0.1)


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_roundtrip_and_uniqueness(tmp_path):
    with Storage(tmp_path / "s.db") as st:
        s = _new(st)
        assert [l.name for l in st.layers(s.id)] == [l.name for l in LAYERS]
        assert st.add_measurement(s.id, _m("isolated/4/down.0.conv")) is True
        assert st.add_measurement(s.id, _m("isolated/4/down.0.conv", psnr=1.0)) is False  # stored once, first wins
        got = st.measurements(s.id)
        assert len(got) == 1 and got[0].psnr == 50.0 and got[0].per_prompt == (49.0, 51.0)
        assert st.get_search(s.id).evaluations == 1
        assert st.add_baseline(s.id, Baseline("original", 90.0, (90.0,), "n", 0.1))
        assert not st.add_baseline(s.id, Baseline("original", 10.0, (10.0,), "n", 0.1))
        assert st.add_palette(s.id, PaletteInfo("down.0.conv", 4, "d" * 64, 1e-6, "x.npz"))
        assert not st.add_palette(s.id, PaletteInfo("down.0.conv", 4, "e" * 64, 1e-6, "x.npz"))
        r = StoredRecipe("recipe_6.00_bit_mixedpalette", "apple", 40.0, None, {"down.0.conv": 4, "mid.attn.to_q": 8},
                         6.0, 0.01, None, None, None, None, None)
        assert st.add_recipe(s.id, r) and not st.add_recipe(s.id, r)
        assert st.set_recipe_result(s.id, r.key, psnr=41.0, per_prompt=(41.0,), node="n", duration_s=0.2)
        assert not st.set_recipe_result(s.id, r.key, psnr=1.0, per_prompt=(1.0,), node="n", duration_s=0.2)
        assert st.recipes(s.id)[0].psnr == 41.0
        assert st.get_search(s.id[:6]).id == s.id  # unique prefix


def test_search_ids_and_prefix_errors(tmp_path):
    with Storage(tmp_path / "s.db") as st:
        with pytest.raises(StorageError, match="no search 'nope'"):
            st.get_search("nope")


def test_reopen_keeps_data_and_version(tmp_path):
    path = tmp_path / "s.db"
    with Storage(path) as st:
        sid = _new(st).id
        st.add_measurement(sid, _m("k1"))
    with Storage(path) as st:
        assert st.measured_keys(sid) == {"k1"}
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA user_version").fetchone()[0] == LATEST_VERSION
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()


@pytest.mark.parametrize("content", [b"hello, not a database\n" * 10, b"SQLite format 3\x00" + b"\x00" * 200])
def test_foreign_or_corrupt_file_is_refused_and_untouched(tmp_path, content):
    path = tmp_path / "foreign.db"
    path.write_bytes(content)
    before = sha(path)
    with pytest.raises(StorageError) as exc:
        Storage(path)
    assert "\n" not in str(exc.value)
    assert sha(path) == before
    assert not (tmp_path / "foreign.db-wal").exists()


def test_other_applications_database_is_refused(tmp_path):
    path = tmp_path / "other.db"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE customers (id INTEGER)")
    con.commit()
    con.close()
    before = sha(path)
    with pytest.raises(StorageError, match="another application"):
        Storage(path)
    assert sha(path) == before


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "s.db"
    Storage(path).close()
    con = sqlite3.connect(path)
    con.execute(f"PRAGMA user_version={LATEST_VERSION + 5}")
    con.commit()
    con.close()
    before = sha(path)
    with pytest.raises(StorageError, match="newer"):
        Storage(path)
    assert sha(path) == before


def test_failed_transaction_rolls_back(tmp_path):
    with Storage(tmp_path / "s.db") as st:
        sid = _new(st).id
        with pytest.raises(RuntimeError):
            with st.session_scope() as db:
                from storage.schema import MeasurementRow

                db.add(MeasurementRow(search_id=sid, key="half", phase="isolated", psnr=1.0, per_prompt_json="[]",
                                      node="n", worker="w", duration_s=0.0))
                db.flush()
                raise RuntimeError("boom")
        assert st.measured_keys(sid) == set()


def test_claim_refuses_a_live_driver(tmp_path):
    with Storage(tmp_path / "s.db") as st:
        sid = _new(st).id
        st.claim(sid, "test:1", lambda s: False)  # the creator claims its own search
        with pytest.raises(StorageError, match="already running"):
            st.claim(sid, "host:2", lambda s: False)
        assert st.claim(sid, "host:2", lambda s: True).owner == "host:2"  # stale holder: taken over


def _writer(path, worker, n):
    st = Storage(path)
    sid = st.create_search(model=f"m{worker}", model_version="m", model_location=f"/m{worker}", model_source="local",
                           fingerprint="f", config={}, config_hash=str(worker), layers=LAYERS).id
    for i in range(n):
        st.add_measurement(sid, _m(f"k{i}", psnr=float(i)))
    st.close()


def test_concurrent_processes_write_without_lock_errors(tmp_path):
    path = tmp_path / "s.db"
    Storage(path).close()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, w, 150)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    with Storage(path) as st:
        searches = st.list_searches()
        assert len(searches) == 3
        for s in searches:
            ms = st.measurements(s.id)
            assert len(ms) == 150 and len({m.key for m in ms}) == 150
            assert s.evaluations == 150


def test_v1_database_is_migrated_in_place(tmp_path):
    """A database written by schema v1 gains the v2 table and keeps its rows."""
    from sqlalchemy import create_engine

    from storage import Validation, schema
    from storage.engine import APPLICATION_ID

    path = tmp_path / "v1.db"
    engine = create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        schema.Base.metadata.create_all(conn, tables=[t.__table__ for t in schema.V1_TABLES])
        conn.exec_driver_sql("PRAGMA user_version=1")
        conn.exec_driver_sql(f"PRAGMA application_id={APPLICATION_ID}")
    engine.dispose()
    with Storage(path) as st:
        sid = _new(st).id
        st.put_validation(sid, Validation("r", "/x.mlpackage", 10, 4.0, True, "ok", 40.0, True, None, "not macOS", "n"))
        st.put_validation(sid, Validation("r", "/y.mlpackage", 11, 4.0, True, "ok", 41.0, True, None, "not macOS", "n"))
        v = st.validations(sid)
        assert list(v) == ["r"] and v["r"].mlpackage == "/y.mlpackage" and v["r"].numeric_psnr == 41.0
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA user_version").fetchone()[0] == LATEST_VERSION
    con.close()


def test_v2_database_gains_preparing_columns_and_keeps_its_searches(tmp_path):
    """Schema v3: a v2 database (searches without request_hash / prepare_* columns) is upgraded in
    place; its searches read back as prepared, and searches to be prepared work next to them."""
    from sqlalchemy import create_engine

    from storage import schema
    from storage.engine import APPLICATION_ID

    path = tmp_path / "v2.db"
    engine = create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        schema.Base.metadata.create_all(conn)
        conn.exec_driver_sql("DROP INDEX ix_searches_request_hash")
        for col in ("request_hash", "prepare_done", "prepare_total"):  # the v2 table, exactly
            conn.exec_driver_sql(f"ALTER TABLE searches DROP COLUMN {col}")
        conn.exec_driver_sql("PRAGMA user_version=2")
        conn.exec_driver_sql(f"PRAGMA application_id={APPLICATION_ID}")
    engine.dispose()
    with Storage(path) as st:
        old = _new(st)
    with Storage(path) as st:
        assert st.get_search(old.id).prepared and st.get_search(old.id).request_hash is None
        new = st.create_search(model="m", model_version="m", model_location="m", model_source="", fingerprint="",
                               config={"nbits": [8]}, config_hash="r" * 64, layers=[], request_hash="r" * 64,
                               phase="preparing")
        assert not new.prepared and st.layers(new.id) == []
        assert [s.id for s in st.find_unfinished_request("r" * 64)] == [new.id]
        st.set_prepare_progress(new.id, 10, 100)
        got = st.get_search(new.id)
        assert (got.prepare_done, got.prepare_total, got.phase) == (10, 100, "preparing")
        done = st.set_prepared(new.id, model_version="m", model_location="/m", model_source="local",
                               fingerprint="f" * 64, config={"nbits": [8]}, config_hash="c" * 64, layers=LAYERS)
        assert done.prepared and len(st.layers(new.id)) == 2
        assert [s.id for s in st.find_unfinished_request("r" * 64)] == [new.id]  # still a duplicate
        with pytest.raises(StorageError, match="already prepared"):
            st.set_prepared(new.id, model_version="m", model_location="/m", model_source="local",
                            fingerprint="f" * 64, config={}, config_hash="c" * 64, layers=[])
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA user_version").fetchone()[0] == LATEST_VERSION
    con.close()


def _add_one(path, sid, key):
    with Storage(path) as st:
        st.add_measurement(sid, _m(key))


def test_reopening_in_one_process_keeps_locks_while_others_write(tmp_path):
    """Opening the same database twice in one process must not drop SQLite's POSIX locks:
    otherwise a writer in another process deletes the WAL when it closes, and this process
    then reads 'database disk image is malformed'."""
    path = tmp_path / "s.db"
    first = Storage(path)
    sid = _new(first).id
    first.add_measurement(sid, _m("k0"))
    second = Storage(path)  # a long-lived process (service, benchmark) opening it again
    ctx = mp.get_context("spawn")
    for i in range(1, 4):
        p = ctx.Process(target=_add_one, args=(path, sid, f"k{i}"))
        p.start()
        p.join(60)
        assert p.exitcode == 0
        assert len(first.measurements(sid)) == i + 1
        assert len(second.measurements(sid)) == i + 1
    second.close()
    first.close()
