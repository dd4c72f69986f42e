"""The dashboard's read-only storage against real SQLite: it reads what `Storage` reads, never
takes the write lock (a writer commits while a reader's transaction is open; the reference: a
`Storage` transaction held open blocks that writer), and cannot write."""

import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy import text

from common.clock import utcnow
from storage import Storage
from storage.reader import ReadOnlyStorage
from tests.storage.test_storage import _m, _new


def _insert_while_held(writer: Storage, held, sid: str, key: str) -> float:
    """Seconds a writer's insert takes while ``held`` (a storage) keeps a transaction open for 2 s."""
    done = threading.Event()
    took = []

    def insert():
        t0 = time.monotonic()
        writer.add_measurement(sid, _m(key))
        took.append(time.monotonic() - t0)
        done.set()

    with held.session_scope() as db:
        db.execute(text("SELECT COUNT(*) FROM measurements")).all()  # a read: the reader's snapshot begins
        t = threading.Thread(target=insert)
        t.start()
        done.wait(2.0)
    t.join()
    return took[0]


def test_reader_reads_the_same_and_never_holds_the_write_lock(tmp_path):
    db = tmp_path / "s.db"
    with Storage(db) as writer:
        s = _new(writer)
        for i in range(5):
            writer.add_measurement(s.id, _m(f"isolated/{i}", psnr=40.0 + i, position=i))
        reader = ReadOnlyStorage(db)
        assert reader.measurements(s.id) == writer.measurements(s.id)
        assert reader.get_search(s.id) == writer.get_search(s.id)
        rows = reader.recent_evaluations(utcnow() - timedelta(minutes=1), [s.id])
        assert [(r[0], r[1], r[2], r[3]) for r in rows] == [(s.id, "node", "w", 5)]
        assert reader.recent_evaluations(utcnow() + timedelta(minutes=1), [s.id]) == []
        # A reader's open transaction does not delay the writer; a writing Storage's does.
        assert _insert_while_held(writer, reader, s.id, "isolated/new") < 0.5
        other = Storage(db)
        assert _insert_while_held(writer, other, s.id, "isolated/blocked") > 1.5
        other.close()
        assert len(reader.measurements(s.id)) == 7
        with pytest.raises(Exception, match="readonly"):
            reader.add_measurement(s.id, _m("isolated/by-reader"))
        assert len(writer.measurements(s.id)) == 7
        reader.close()
