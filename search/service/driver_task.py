"""One search's driver as a Ray task (``drive_task``) on the service's node: it claims the search,
runs `search.driver.jobs.run_search` with a `ProgressFile` for its bars, and returns a summary.
Every failure of the search itself is recorded in the database by the driver.

**How drivers run.** Each search's driver is a *Ray task* (``drive_task``, ``num_cpus=0``,
``max_retries=0``) pinned with a hard ``NodeAffinitySchedulingStrategy`` to the node this
service runs on: the SQLite database and the palette files are local files there, and SQLite
must not be shared over a network file system. The task opens `Storage`, claims the search and
calls `search.driver.jobs.run_search`, which creates the evaluator actors anywhere in the cluster
(GPU workers, Macs with the ``coreml`` resource, ...). A task rather than a Ray *job*:
the job API lives in the dashboard (which small or locked-down clusters run without), starts a
whole new driver process per search, and would hand back only a job id; a task returns an
``ObjectRef`` the service keeps for `cancel` / shutdown, its failures come back as exceptions,
and it shares the service's fate, which is what resume-on-restart expects.
Node affinity is by node *id*, not by the ``node:<ip>`` resource, because several Ray nodes
may share one IP (the multi-node tests run two nodes on 127.0.0.1).
"""
from __future__ import annotations

import time
from pathlib import Path

import ray

from common.clock import utcnow
from common.errors import first_line
from search.driver.driver import driver_id
from search.service.progress_file import ProgressFile
from storage import Search, Storage, StorageError
from storage.records import ACTIVE


def stale(s: Search) -> bool:
    """Its driver is gone (see `Search.driver_gone`)."""
    return s.driver_gone(utcnow())


def _wait_for_gpus(timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while ray.cluster_resources().get("GPU", 0) < 1:
        if time.monotonic() > deadline:
            raise RuntimeError(f"no GPU node joined the cluster within {timeout_s:.0f} s (autoscaler request "
                               "pending); check `ray status` and the cluster's max_workers / quotas")
        time.sleep(5)


def drive(db_path: str, progress_path: str, prepared, workers: int | None, handed_from: str,
          wait_gpus_s: float, packages_dir: str | None = None) -> dict:
    """Run one search's driver (inside a Ray task on the service's node). Returns a summary;
    ``packages_dir``: where its ``coreml`` phase keeps the packages (the service's data dir)."""
    from storage.package_store import PackageStore

    from search.driver.driver import SearchFailed, SearchInterrupted
    from search.driver.jobs import run_search

    sid = prepared.search.id
    storage = Storage(db_path)
    try:
        if storage.get_search(sid).status == "cancelling":  # cancelled while queued
            storage.update_search(sid, status="cancelled")
            return {"id": sid, "status": "cancelled"}
        me = driver_id()
        try:
            storage.claim(sid, me, lambda cur: cur.owner == handed_from or stale(cur))
        except StorageError as exc:  # another live driver holds it: leave it alone
            return {"id": sid, "status": "refused", "error": first_line(exc)}
        reporter = ProgressFile(Path(progress_path), run=f"{me}@{time.time():.3f}")
        try:
            if wait_gpus_s > 0:
                reporter.message("waiting for the autoscaler to add GPU workers")
                _wait_for_gpus(wait_gpus_s)
            search, driver = run_search(storage, prepared, workers=workers, reporter=reporter,
                                        packages=PackageStore(packages_dir) if packages_dir else None)
        except (SearchInterrupted, SearchFailed):
            return {"id": sid, "status": storage.get_search(sid).status}
        except Exception as exc:
            s = storage.get_search(sid)
            if s.status in ACTIVE:  # failed before the driver took over (e.g. no GPUs)
                storage.update_search(sid, status="failed", error=first_line(exc))
            raise
        reporter.finish(evaluations=driver.evaluations, reference_runs=driver.reference_runs,
                        first_result_s=driver.first_result_s, shipped_bytes=driver.shipped_bytes,
                        timings=driver.timings)
        return {"id": sid, "status": search.status, "evaluations": driver.evaluations}
    finally:
        storage.close()


drive_task = ray.remote(num_cpus=0, max_retries=0)(drive)
