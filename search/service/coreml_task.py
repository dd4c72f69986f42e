"""The ``coreml`` phase of a finished search as a Ray task on the service's node
(``POST /searches/{id}/coreml``, `search apply ID --server`): the same `CoreMLPhase` a search
submitted with ``--apply`` runs after its recipes, with the model's weights shipped to the Core
ML node as the evaluators get them. Pinned to the service's node for the same reason as the
drivers (search.service.driver_task): the database and the package store are local files there.
"""
from __future__ import annotations

import time
from pathlib import Path

import ray

from common.errors import first_line
from search.service.progress_file import ProgressFile
from storage import Storage
from storage.coreml_store import CoreMLStore
from storage.package_store import PackageStore


def run_coreml(db_path: str, packages_dir: str, progress_path: str, search_id: str) -> dict:
    """Apply, validate and ship the asked recipes of a finished search; the job row says how it ended."""
    from search.driver.coreml_phase import CoreMLPhase
    from workers.models import model_options, resolve_model
    from workers.weights import WeightShipper, fetch_pipeline

    storage = Storage(db_path)
    jobs = CoreMLStore(storage)
    try:
        search = storage.get_search(search_id)
        reporter = ProgressFile(Path(progress_path), run=f"coreml@{time.time():.3f}")
        try:
            spec = resolve_model(search.model, **model_options(search.config))
            shipper = WeightShipper(fetch_pipeline(spec), search.fingerprint)
            phase = CoreMLPhase(storage, search, PackageStore(packages_dir), spec=spec, weights=shipper.manifest(),
                                reporter=reporter)
        except Exception as exc:  # before the phase took over: say why on the job
            jobs.update(search_id, status="failed", error=first_line(exc))
            raise
        try:
            phase.run()
        except Exception:
            pass  # recorded on the job row by the phase
        reporter.finish(shipped_bytes=phase.shipped_bytes, ship_s=phase.ship_s)
        job = jobs.job(search_id)
        return {"id": search_id, "status": job.status, "error": job.error}
    finally:
        storage.close()


coreml_task = ray.remote(num_cpus=0, max_retries=0)(run_coreml)
