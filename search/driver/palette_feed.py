"""Palette fitting as Ray CPU tasks, fed into the evaluator pool as palettes arrive.

The evaluators compute each candidate's fp16 bit-pattern histogram where its weight is (a
``torch.bincount`` on the GPU); the k-means itself (`workers.palettize.palette_from_histogram`,
coremltools' ``kmeans1d``, so the palette and its digest are what the in-actor fit gives) runs
as CPU tasks spread over the cluster's free cores, never inside the GPU actors. Under Apple's
protocol a candidate under 10,000 elements comes as its float16 weight instead, and the task runs
coremltools' own k-means call on it, as Apple's script does (`palette_from_sample`). Every palette is
stored the moment it arrives, and the items that only waited for it (the isolated measurement
of that layer at that depth) go to the evaluators at once.

`PaletteStage` is the driver's side of it (`SearchDriver` inherits it): loading the stored palettes
into Ray's object store, starting a feed for the missing ones and running items beside it.
"""
from __future__ import annotations

import time
from typing import Callable

import ray
from ray.exceptions import RayError

from search.driver.palettes import load_stored_palette
from search.driver.pool import ItemFailed
from search.driver.signals import SearchFailed
from search.recipes.strategy import skipped_note, unfit
from search.recipes.tables import load_tables
from storage import PaletteInfo
from workers.evaluation.items import WorkItem
from workers.palette_formats import PaletteError, palette_from_sample, save_palette

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


class PaletteStage:
    """`SearchDriver` inherits it: the palettes of a search on the driver's side. Needs the driver's
    ``storage``, ``search``, ``config``, ``palette_store``, ``palette_refs``, ``reuse``, ``reporter``,
    ``actor_cpus``, ``timings``, ``_run_items``, ``_store_isolated`` and ``_submit_eval``."""

    def _load_palettes(self, wanted=None) -> None:
        """Put the stored palettes (those in ``wanted``, else all) in Ray's object store, checked."""
        for key, info in self.storage.palettes(self.search.id).items():
            if wanted is None or key in wanted:
                try:
                    self.palette_refs[key] = ray.put(load_stored_palette(self.palette_store, info))
                except PaletteError as exc:
                    raise SearchFailed(str(exc)) from None

    def _palette_feed(self, waiting: dict) -> PaletteFeed:
        """Load the stored palettes; the missing ones are fitted by CPU tasks from histograms the
        evaluators compute (`search.driver.palette_feed`). Unfit formats are skipped, said once."""
        sid, sizes = self.search.id, load_tables(self.storage, self.search.id).sizes
        if skipped := set(unfit(self.config, sizes)):
            self.reporter.message(f"[dim]{skipped_note(self.config, sizes)}")
        wanted = [(layer, bits) for layer in sizes for bits in self.config.nbits if (layer, bits) not in skipped]
        self.reuse.take_palettes(wanted)
        self._load_palettes(set(wanted))
        missing = [key for key in wanted if key not in self.palette_refs]

        def store(layer: str, bits: int, palette) -> None:
            rel = self.palette_store.write(sid, layer, bits, lambda path: save_palette(path, palette))
            self.storage.add_palette(sid, PaletteInfo(layer, bits, palette.digest, float(palette.weight_mse), rel,
                                                      reuse_key=self.reuse.palette_key(layer, bits)))
            self.palette_refs[(layer, bits)] = ray.put(palette)

        cpus, in_flight = task_cpus(self.actor_cpus)
        self.reporter.phase_start("palettes", len(missing))
        return PaletteFeed(missing, store, cpus=cpus, in_flight=in_flight, waiting=waiting,
                           on_fit=lambda: self.reporter.advance("palettes"))

    def _fit_palettes(self, feed: PaletteFeed, phase: str, items: list[WorkItem], total: int) -> None:
        """Run ``items`` while the feed fits the palettes (and releases what waited for them)."""
        def store(item: WorkItem, result) -> None:
            if item.phase == "palette":
                feed.add_histogram(item, result)
            else:
                self._store_isolated(item, result)

        self._run_items(phase, feed.histogram_items() + feed.ready_items() + items, self._submit, store, feed=feed,
                        total=total)
        self.timings["palettes"] = feed.fit_s
        self.reporter.phase_end("palettes")
        if feed.fits:
            self.reporter.message(f"{feed.fits} palette(s) fitted by CPU tasks in {feed.fit_s:.1f} s")

    def _submit(self, actor, item: WorkItem):
        return actor.histogram.remote(item) if item.phase == "palette" else self._submit_eval(actor, item)
