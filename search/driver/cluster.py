"""The Ray cluster as the driver sees it: joining or starting it, sizing the evaluator pool
from its resources, and naming this driver process (the owner recorded on a search)."""
from __future__ import annotations

import os
import sys

import ray

from common.processes import process_token


def driver_id() -> str:
    """This process as a search's owner: host, pid and start time (see common.processes)."""
    return process_token()


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to a cluster when given an address (or RAY_ADDRESS), else start a small local
    instance without the dashboard; on a Mac the local node offers the `coreml` resource."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    else:
        resources = {"coreml": 1} if sys.platform == "darwin" else None
        ray.init(num_cpus=num_cpus or os.cpu_count() or 2, include_dashboard=False, logging_level="ERROR",
                 log_to_driver=False, resources=resources)


def plan_workers(requested: int | None) -> tuple[int, float, float, int]:
    """(actors, cpus per actor, gpus per actor, torch threads) from the cluster's resources."""
    res = ray.cluster_resources()
    gpus, cpus = int(res.get("GPU", 0)), float(res.get("CPU", 1))
    if gpus:
        n = requested or gpus
        return n, 1.0, 1.0, max(1, int(cpus // n))
    n = requested or 2
    per = min(1.0, cpus / n)
    return n, per, 0.0, max(1, int(cpus // n))
