"""Palette fitting as Ray CPU tasks, fed into the evaluator pool as palettes arrive.

The evaluators compute each candidate's fp16 bit-pattern histogram where its weight is (a
``torch.bincount`` on the GPU); the k-means itself (`workers.palettize.palette_from_histogram`,
coremltools' ``kmeans1d``, so the palette and its digest are what the in-actor fit gives) runs
as CPU tasks spread over the cluster's free cores, never inside the GPU actors. Under Apple's
protocol a candidate under 10,000 elements comes as its float16 weight instead, and the task runs
coremltools' own k-means call on it, as Apple's script does (`palette_from_sample`). Every palette is
stored the moment it arrives, and the items that only waited for it (the isolated measurement
of that layer at that depth) go to the evaluators at once.
"""
from __future__ import annotations

import time
from typing import Callable

import ray
from ray.exceptions import RayError

from search.driver.pool import ItemFailed
from workers.evaluation.items import WorkItem
from workers.palette_formats import palette_from_sample

_fit = ray.remote(max_retries=3, retry_exceptions=False)(palette_from_sample)


def task_cpus(actor_cpus: float) -> tuple[float, int]:
    """(CPUs per palette task, tasks in flight): one core each on the cores the evaluators left
    free; where they hold every core (CPU-only searches) zero-CPU tasks, at most two at a time."""
    free = float(ray.cluster_resources().get("CPU", 1)) - actor_cpus
    return (1.0, int(free)) if free >= 1 else (0.0, 2)


class PaletteFeed:
    """The palettes still to fit, as histogram work items for the pool plus CPU tasks.

    ``store(layer, bits, palette)`` keeps a palette (file, database, object store);
    ``waiting[(layer, bits)]`` lists the work items to release when that palette exists.
    A layer gets one histogram for its per-tensor formats and one per group size of its grouped
    formats (a row of counts per channel group), so each format is fitted from its own counts.
    """

    def __init__(self, missing: list[tuple[str, int]], store: Callable, *, cpus: float, in_flight: int,
                 waiting: dict | None = None, on_fit: Callable[[], None] = lambda: None):
        self.bits_of: dict[tuple[str, int | None], list] = {}  # (layer, group size) -> formats
        for layer, bits in missing:
            self.bits_of.setdefault((layer, getattr(bits, "group_size", None)), []).append(bits)
        self.store, self.on_fit = store, on_fit
        self.waiting = waiting or {}
        self.cpus, self.max_in_flight = cpus, max(1, in_flight)
        self.backlog: list[tuple[str, int, object]] = []  # (layer, bits, histogram ref) not yet submitted
        self.pending: dict = {}  # task ref -> (layer, bits)
        self.histograms_left = len(self.bits_of)
        self.fits = 0
        self.fit_s = 0.0  # wall time from the first histogram to the last palette
        self._t0: float | None = None

    def histogram_items(self) -> list[WorkItem]:
        """One per (layer, group size); a grouped one carries a format of that group size."""
        return [WorkItem(f"histogram/{layer}" if g is None else f"histogram/g{g}/{layer}", "palette", layer=layer,
                         bits=None if g is None else bits[0]) for (layer, g), bits in self.bits_of.items()]

    def ready_items(self) -> list[WorkItem]:
        """Waiting items whose palettes all exist already (stored by an earlier run)."""
        missing = {(layer, b) for (layer, _), bits in self.bits_of.items() for b in bits}
        out = []
        for key in [k for k in self.waiting if k not in missing]:
            out += self.waiting.pop(key)
        return out

    @property
    def done(self) -> bool:
        return not self.histograms_left and not self.backlog and not self.pending

    def add_histogram(self, item: WorkItem, counts) -> None:
        """A histogram item came back from an evaluator: fit every missing format it serves."""
        if self._t0 is None:
            self._t0 = time.monotonic()
        ref = ray.put(counts)
        self.histograms_left -= 1
        group = None if item.bits is None else item.bits.group_size
        self.backlog += [(item.layer, bits, ref) for bits in self.bits_of[(item.layer, group)]]

    def refs(self) -> list:
        """Submit what fits in flight; the task refs to wait on."""
        while self.backlog and len(self.pending) < self.max_in_flight:
            layer, bits, ref = self.backlog.pop(0)
            task = _fit.options(num_cpus=self.cpus).remote(ref, bits)
            self.pending[task] = (layer, bits)
        return list(self.pending)

    def owns(self, ref) -> bool:
        return ref in self.pending

    def collect(self, ref) -> list[WorkItem]:
        """Store the finished palette; return the work items it releases."""
        layer, bits = self.pending.pop(ref)
        try:
            palette = ray.get(ref)
        except RayError as exc:
            text = str(getattr(exc, "cause", None) or exc).strip().splitlines()
            raise ItemFailed(WorkItem(f"palette/{bits}/{layer}", "palette", bits=bits, layer=layer),
                             text[-1] if text else type(exc).__name__) from None
        self.store(layer, bits, palette)
        self.fits += 1
        self.fit_s = time.monotonic() - (self._t0 or time.monotonic())
        self.on_fit()
        return self.waiting.pop((layer, bits), [])
