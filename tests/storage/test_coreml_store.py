"""The Core ML stage's rows (schema v5) through real SQLite: a v4 database gains the tables and
keeps its searches; a job's progress as `search status` shows it, a failed validation marked
with its reason while the search's measurements stay as they were."""
import sqlite3

from storage import Storage, StoredRecipe, Validation
from storage.coreml_store import CoreMLStore
from storage.migrations import LATEST_VERSION
from storage.records import PackageInfo
from tests.storage.test_storage import _m, _new


def _downgrade_to_v4(path) -> None:
    con = sqlite3.connect(path)
    con.executescript("DROP TABLE coreml_packages; DROP TABLE coreml_jobs; PRAGMA user_version=4;")
    con.close()


def test_v4_database_gains_the_coreml_tables(tmp_path):
    path = tmp_path / "v4.db"
    with Storage(path) as st:
        sid = _new(st).id
        st.add_measurement(sid, _m("isolated/4/down.0.conv"))
    _downgrade_to_v4(path)
    with Storage(path) as st:
        assert [m.key for m in st.measurements(sid)] == ["isolated/4/down.0.conv"]
        assert CoreMLStore(st).job(sid) is None and CoreMLStore(st).packages(sid) == {}
        job = CoreMLStore(st).request(sid, "all", "coreml")
        assert (job.status, job.keys, job.coreml_node) == ("queued", None, "coreml")
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA user_version").fetchone()[0] == LATEST_VERSION
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_progress_marks_a_failed_validation_and_keeps_the_measurements(tmp_path):
    from search.cli import views
    from search.read_models import coreml_progress

    with Storage(tmp_path / "s.db") as st:
        s = _new(st)
        st.add_measurement(s.id, _m("isolated/4/down.0.conv"))
        for key in ("a", "b", "c"):
            st.add_recipe(s.id, StoredRecipe(key, "apple", 40.0, None, {"down.0.conv": 4}, 4.0, 0.01, None, 41.0,
                                             (41.0,), "n", 0.1))
        before = (st.measurements(s.id), st.recipes(s.id))
        jobs = CoreMLStore(st)
        jobs.request(s.id, "a,b,c", "any")
        jobs.update(s.id, status="running", node="mac")
        for key, ok in (("a", True), ("b", False)):
            st.put_validation(s.id, Validation(key, f"/x/{key}.mlpackage", 10, 4.0, ok, "fine" if ok else
                                               "1 problem: down.0.conv: LUT differs", 41.0, ok or None, None,
                                               "not run", "mac"))
            jobs.put_package(s.id, PackageInfo(key, "shipped", "" if ok else "1 problem: down.0.conv: LUT differs",
                                               f"{s.id}/{key}.mlpackage.zip", 2_000_000, "ab" * 32, "mac", 0.1))
        jobs.put_package(s.id, PackageInfo("c", "failed", "CoreMLError: layer x absent", None, 0, "", "", 0.0))
        p = coreml_progress(st, st.get_search(s.id))
        assert (p["status"], p["recipes"], p["applied"], p["validated"], p["failed"]) == ("running", 3, 2, 1, ["b", "c"])
        assert p["shipped_mb"] == 4.0 and p["node"] == "mac"
        assert p["packages"]["c"]["detail"] == "CoreMLError: layer x absent" and "path" not in p["packages"]["a"]
        assert (st.measurements(s.id), st.recipes(s.id)) == before
    with views.out.capture() as cap:
        views.coreml_line(p)
    text = cap.get()
    assert "applied and shipped 2/3, validated 1, 4.00 MB shipped" in text
    assert "b failed: 1 problem: down.0.conv: LUT differs" in text and "c failed: CoreMLError: layer x absent" in text
