"""A pool of evaluator actors that keeps each busy and survives actors dying.

The driver hands it work items; it yields (item, result) in completion order. An actor that
dies is replaced and its in-flight items re-queued; an item whose evaluation raises is
retried, and the third failure of the same item stops the run with `ItemFailed`.
"""
from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

from workers.evaluation.evaluator import Evaluator
from workers.evaluation.items import WorkItem

MAX_ATTEMPTS = 3
IN_FLIGHT_PER_ACTOR = 2


class ItemFailed(RuntimeError):
    def __init__(self, item: WorkItem, error: str):
        where = f"layer {item.layer} at {item.bits} bits" if item.layer else item.key
        super().__init__(f"{item.phase} evaluation of {where} failed {MAX_ATTEMPTS} times: {error}")
        self.item, self.error = item, error


class PoolError(RuntimeError):
    pass


@dataclass
class _Slot:
    actor: object
    in_flight: dict = field(default_factory=dict)  # ObjectRef -> WorkItem


def _short(exc: BaseException) -> str:
    text = str(getattr(exc, "cause", None) or exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__


class EvaluatorPool:
    """`target_size()` (optional) is polled so the pool grows when the cluster does (autoscaling);
    `can_place()` says whether a dead actor can be replaced now, else its slot is dropped (the
    node vanished) as long as one evaluator remains."""

    RESIZE_EVERY_S = 5.0

    def __init__(self, size: int, make_actor: Callable[[], object], *, max_replacements: int | None = None,
                 target_size: Callable[[], int] | None = None, can_place: Callable[[], bool] = lambda: True):
        if size < 1:
            raise PoolError("need at least one evaluator")
        self._make = make_actor
        self.slots = [_Slot(make_actor()) for _ in range(size)]
        self.replacements = 0
        self.max_replacements = size * 3 if max_replacements is None else max_replacements
        self.infos: list[dict] = []
        self._target_size, self._can_place = target_size, can_place
        self._last_resize = time.monotonic()
        self.grown = self.dropped = 0

    def start(self, should_stop: Callable[[], bool] = lambda: False, timeout_s: float = 1800) -> list[dict]:
        """Wait for every actor to load the model and compute its reference output, calling
        ``should_stop`` (the driver's heartbeat and cancel check) every second: a slow start on a
        busy machine must not look like a dead driver. [] if it said stop."""
        refs = [slot.actor.info.remote() for slot in self.slots]
        deadline = time.monotonic() + timeout_s
        try:
            while len(ray.wait(refs, num_returns=len(refs), timeout=1.0)[0]) < len(refs):
                if should_stop():
                    return []
                if time.monotonic() > deadline:
                    raise PoolError(f"the evaluators did not start within {timeout_s:.0f} s")
            self.infos = ray.get(refs)
        except RayActorError as exc:
            raise PoolError(f"an evaluator failed to start: {_short(exc)}") from None
        return self.infos

    def _replace(self, slot: _Slot) -> None:
        self.replacements += 1
        if self.replacements > self.max_replacements:
            raise PoolError(f"evaluators died {self.replacements} times; giving up")
        try:
            ray.kill(slot.actor, no_restart=True)
        except Exception:
            pass
        slot.in_flight = {}
        if len(self.slots) > 1 and not self._wait_for_room():
            self.slots.remove(slot)  # its node is gone; grow again when the cluster does
            self.dropped += 1
            return
        slot.actor = self._make()

    def _wait_for_room(self, timeout_s: float = 5.0) -> bool:
        """A dead actor's resources are released a moment after its death is reported."""
        deadline = time.monotonic() + timeout_s
        while not self._can_place():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)
        return True

    def _maybe_grow(self) -> None:
        if self._target_size is None or time.monotonic() - self._last_resize < self.RESIZE_EVERY_S:
            return
        self._last_resize = time.monotonic()
        while len(self.slots) < self._target_size() and self._can_place():
            self.slots.append(_Slot(self._make()))
            self.grown += 1

    def run(self, items: Iterable[WorkItem], submit: Callable[[object, WorkItem], object],
            should_stop: Callable[[], bool] = lambda: False, feed=None) -> Iterator[tuple[WorkItem, object]]:
        """Yield (item, result) as results arrive. `submit(actor, item)` returns an ObjectRef.

        ``feed`` (optional, e.g. `search.driver.palette_feed.PaletteFeed`) runs other Ray work
        alongside: its ``refs()`` are waited on too, ``collect(ref)`` returns the items a finished
        one releases (queued at once), and the run lasts until it is ``done``."""
        queue = collections.deque(items)
        attempts: collections.Counter = collections.Counter()
        while queue or any(s.in_flight for s in self.slots) or (feed is not None and not feed.done):
            if should_stop():
                return
            self._maybe_grow()
            for slot in self.slots:
                while queue and len(slot.in_flight) < IN_FLIGHT_PER_ACTOR:
                    item = queue.popleft()
                    slot.in_flight[submit(slot.actor, item)] = item
            pending = [ref for s in self.slots for ref in s.in_flight] + (feed.refs() if feed is not None else [])
            if not pending:
                time.sleep(0.01)
                continue
            ready, _ = ray.wait(pending, num_returns=1, timeout=1.0)
            for ref in ready:
                if feed is not None and feed.owns(ref):
                    queue.extend(feed.collect(ref))
                    continue
                slot = next(s for s in self.slots if ref in s.in_flight)
                item = slot.in_flight.pop(ref)
                try:
                    result = ray.get(ref)
                except (ActorDiedError, ActorUnavailableError) as exc:
                    # The actor is gone: every item it held goes back to the queue.
                    lost = [item, *slot.in_flight.values()]
                    self._replace(slot)
                    queue.extendleft(reversed(lost))
                    self.on_actor_lost(exc, lost)
                    continue
                except RayTaskError as exc:
                    attempts[item.key] += 1
                    if attempts[item.key] >= MAX_ATTEMPTS:
                        raise ItemFailed(item, _short(exc)) from None
                    queue.append(item)
                    continue
                except RayActorError as exc:
                    lost = [item, *slot.in_flight.values()]
                    self._replace(slot)
                    queue.extendleft(reversed(lost))
                    self.on_actor_lost(exc, lost)
                    continue
                yield item, result

    def on_actor_lost(self, exc: BaseException, lost: list[WorkItem]) -> None:
        """Hook for the driver's log; the default does nothing."""

    def shutdown(self) -> None:
        for slot in self.slots:
            try:
                ray.kill(slot.actor, no_restart=True)
            except Exception:
                pass


def actor_class(num_cpus: float, num_gpus: float, resources: dict | None = None):
    """Evaluators spread over the nodes; Ray never restarts them (the pool does, re-queuing)."""
    return ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0, max_task_retries=0,
                      resources=resources or None, scheduling_strategy="SPREAD")(Evaluator)


def can_place(num_cpus: float, num_gpus: float) -> Callable[[], bool]:
    def check() -> bool:
        free = ray.available_resources()
        return free.get("CPU", 0.0) >= num_cpus and free.get("GPU", 0.0) >= num_gpus

    return check


__all__ = ["EvaluatorPool", "ItemFailed", "PoolError", "actor_class", "can_place", "MAX_ATTEMPTS"]
