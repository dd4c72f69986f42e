"""`search recipe --server`: the optimal recipe for one size or PSNR target of a finished search,
built, measured (and for a size target refined) on the service, as `search recipe` does locally.

``POST /searches/{id}/recipe`` runs `search.driver.jobs.target_recipe` in a Ray task pinned to the
service's node (the database and palettes are local files there: the same rule as the search
drivers, search.service.driver_task) and answers once the recipe is measured: a target recipe
takes one pipeline run per evaluator start plus its refinement's few, so the request waits for it
rather than handing back a job to poll. One at a time per search (409 while one runs, and while
the search itself runs), since both would write the same search's recipes.
"""
from __future__ import annotations

import threading
from typing import Annotated, Optional

import ray
from fastapi import APIRouter, Body, Request
from pydantic import BaseModel, ConfigDict, Field

from common.errors import first_line
from search.defaults import REFINE_EVALS
from search.service.requests import ApiError, find_search
from search.service.responses import errors
from storage.records import ACTIVE

router = APIRouter(tags=["searches"])
_busy: set[str] = set()
_lock = threading.Lock()


class RecipeBody(BaseModel):
    """Exactly one target, as `search recipe`'s --bits / --size-mb / --psnr."""

    model_config = ConfigDict(extra="forbid")
    bits: Optional[float] = Field(None, ge=1, le=16, allow_inf_nan=False,  # no format has under 1 bit
                                  description="average bits per weight at most this")
    size_mb: Optional[float] = Field(None, ge=0.001, allow_inf_nan=False,  # 1 kB
                                     description="candidate weights at most this many MB")
    psnr: Optional[float] = Field(None, gt=0, le=1000, allow_inf_nan=False,
                                  description="smallest recipe predicted to keep this PSNR (dB)")
    refine_evals: int = Field(REFINE_EVALS, ge=0, le=10_000,
                              description="end-to-end measurements of the refinement (0: one-shot)")
    workers: int = Field(1, ge=1, le=1024, description="evaluator actors")


def build_target(db_path: str, search_id: str, bits, size_mb, psnr, workers: int, refine_evals: int) -> dict:
    """Inside the Ray task: the recipe as `search recipe` shows it, or ``{"error": line}`` for a
    target the measurements cannot meet (the user's mistake, not the service's)."""
    from search.config import ConfigError
    from search.driver.jobs import target_recipe
    from search.driver.pool import ItemFailed, PoolError
    from storage import Storage, StorageError
    from workers.models import ModelError

    storage = Storage(db_path)
    try:
        r, _, refined = target_recipe(storage, search_id, bits=bits, size_mb=size_mb, psnr=psnr, workers=workers,
                                      refine_evals=refine_evals)
    except (ConfigError, ModelError, StorageError) as exc:
        return {"error": first_line(exc)}
    except (PoolError, ItemFailed) as exc:  # e.g. more evaluators than the service's node can start
        return {"error": f"the recipe could not be measured: {first_line(exc)}"}
    finally:
        storage.close()
    return {"key": r.key, "target": r.target, "avg_bits": r.avg_bits, "size_mb": r.size_mb,
            "predicted_psnr": r.predicted_psnr, "psnr": r.psnr,
            "refined": None if refined is None else {"evals": refined.evals, "start": refined.start,
                                                     "start_psnr": refined.start_psnr}}


build_task = ray.remote(num_cpus=0, max_retries=0)(build_target)


@router.post("/searches/{search_id}/recipe", responses=errors(404, 409, 422))
def target_recipe_route(search_id: str, request: Request, body: Annotated[RecipeBody, Body()]) -> dict:
    """Build, store and measure the optimal recipe for one target from the search's stored
    measurements; for ``bits`` / ``size_mb``, refine it with ``refine_evals`` end-to-end
    measurements. Answers the recipe once measured."""
    service = request.app.state.service
    s = find_search(service.storage, search_id)
    if sum(v is not None for v in (body.bits, body.size_mb, body.psnr)) != 1:
        raise ApiError(422, "give exactly one of bits, size_mb, psnr")
    if service.running(s.id) or s.status in ACTIVE:
        raise ApiError(409, f"search {s.id} is {s.status}: build target recipes once it has stopped")
    with _lock:
        if s.id in _busy:
            raise ApiError(409, f"a target recipe of search {s.id} is being built already")
        _busy.add(s.id)
    try:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        ref = build_task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(service.node_id, soft=False),
                                 name=f"target-recipe-{s.id}").remote(
            str(service.db_path), s.id, body.bits, body.size_mb, body.psnr, body.workers, body.refine_evals)
        out = ray.get(ref)
    finally:
        with _lock:
            _busy.discard(s.id)
    if "error" in out:
        raise ApiError(422, out["error"])
    return out


__all__ = ["router", "RecipeBody"]
