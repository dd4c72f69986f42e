"""The Ray cluster as the driver sees it: joining or starting it, sizing the evaluator pool
from its resources, and naming this driver process (the owner recorded on a search)."""
from __future__ import annotations

import os
import sys

import ray

from common.processes import descendants, end_processes, process_token, snapshot
from search.driver.signals import deferred, on_hard_exit, reclaim


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
        on_hard_exit(_end_local_ray)  # a second Ctrl-C leaves no process of it behind either
        ray.init(num_cpus=num_cpus or os.cpu_count() or 2, include_dashboard=False, logging_level="ERROR",
                 log_to_driver=False, resources=resources)
    reclaim()


def local_ray_processes() -> dict[int, str | None]:
    """The processes of the local Ray instance this process started (none when it joined a
    cluster) as a `common.processes.snapshot`: the node's own (GCS, raylet, dashboard, monitors)
    and everything below them (the raylet's agents and the evaluators' worker processes)."""
    try:
        node = ray._private.worker._global_node
        own = [p.process.pid for procs in node.all_processes.values() for p in procs] if node is not None else []
    except AttributeError:  # another Ray release: nothing known, nothing ended
        own = []
    return snapshot(own + [child for pid in own for child in descendants(pid)])


def _end_local_ray() -> None:
    end_processes(local_ray_processes(), grace_s=0)


def shutdown_ray(grace_s: float = 3.0) -> None:
    """Leave Ray if this process joined it; of a local instance it started, no process is left
    (Ray's agents can outlive their raylet a while: the rest are ended after ``grace_s``)."""
    if not ray.is_initialized():
        return
    with deferred():  # a Ctrl-C now must not cut the shutdown short
        procs = local_ray_processes()
        try:
            ray.shutdown()
        except Exception:  # a half-stopped instance: its processes are ended below all the same
            pass
        finally:
            end_processes(procs, grace_s)


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
