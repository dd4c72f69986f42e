"""Measurements shared across searches, in the driver (docs/reuse.md).

Before the driver runs a list of work items it hands them to ``Reuse.take``: every item whose
key (``storage.measurement_keys``) some other search of the database has stored (finished or
not) is copied into this search with the source search's id, in one transaction, and only the
rest go to the evaluators. Palettes are copied the same way (``take_palettes``: same file,
checked against the same digest when loaded). The keys need the evaluators' device and dtype,
so a search starts its pool first; until then ``Reuse`` is off and keys are None.

Every result a search stores carries its key (``tag``), also under ``--no-reuse``, so later
searches can take it. A resumed search runs ``take`` again: copying is idempotent and a copied
value equals what the run would measure, by the key's definition.
"""
from __future__ import annotations

from search.config import SearchConfig
from storage import Baseline, Measurement, Search, Storage
from storage.measurement_keys import KeySpace
from storage.reuse_store import copy_results, find_baselines, find_measurements, find_palettes
from workers.evaluation.items import WorkItem

TAKEN = ("baseline", "floor", "isolated", "cumulative", "candidate")  # stored as measurements / baselines


def device_facts(infos: list[dict]) -> tuple[str, str]:
    """(device class, dtype) of the started evaluators: 'cpu', 'float32'; a mixed pool joins them."""
    return ("+".join(sorted({str(i["device"]).split(":")[0] for i in infos})),
            "+".join(sorted({str(i["dtype"]) for i in infos})))


class Reuse:
    """One search's keys and its lookups; ``Reuse(None, ...)`` (before the pool starts) is off."""

    def __init__(self, storage: Storage, search: Search, config: SearchConfig, infos: list[dict] | None,
                 on_copied=lambda n, sources: None):
        self.storage, self.search_id, self.on_copied = storage, search.id, on_copied
        self.space: KeySpace | None = None
        self.device = None
        if infos:
            self.device, dtype = device_facts(infos)
            self.space = KeySpace.of(fingerprint=search.fingerprint, model_version=search.model_version,
                                     config=config.to_dict(), dtype=dtype,
                                     candidates=[layer.name for layer in storage.layers(search.id)])
        self.enabled = bool(self.space) and config.reuse
        self.any_device = config.reuse_across_devices

    def key(self, item: WorkItem) -> str | None:
        if self.space is None:
            return None
        return self.space.measurement(item.phase, name=item.name, layer=item.layer, bits=item.bits,
                                      position=item.position, assignment=item.assignment, linear8=item.linear8)

    def tag(self, item: WorkItem) -> dict:
        """The reuse fields of a result this search measured itself."""
        return dict(reuse_key=self.key(item), reuse_device=self.device)

    def palette_key(self, layer: str, bits) -> str | None:
        return None if self.space is None else self.space.palette(layer, bits)

    def take(self, items: list[WorkItem]) -> list[WorkItem]:
        """Copy the stored results of ``items`` from other searches; return the items left to run."""
        keyed = {k: it for it in items if it.phase in TAKEN and (k := self.key(it))} if self.enabled else {}
        if not keyed:
            return items
        device = None if self.any_device else self.device
        base_keys = [k for k, it in keyed.items() if it.phase == "baseline"]
        found = find_baselines(self.storage, base_keys, exclude=self.search_id, device=device)
        found.update(find_measurements(self.storage, [k for k in keyed if k not in set(base_keys)],
                                       exclude=self.search_id, device=device))
        if not found:
            return items
        baselines, measurements = [], []
        for k, f in found.items():
            it = keyed[k]
            copy = dict(reuse_key=k, reuse_device=f.device, reused_from=f.source)
            if it.phase == "baseline":
                baselines.append(Baseline(it.name, f.psnr, f.per_prompt, f.node, f.duration_s, **copy))
            else:
                measurements.append(Measurement(it.key, it.phase, it.bits, it.layer, it.position, f.psnr, f.per_prompt,
                                                f.node, f.worker, f.duration_s, **copy))
        n = copy_results(self.storage, self.search_id, measurements, baselines)
        self.on_copied(n, sorted({f.source for f in found.values()}))
        taken = {id(keyed[k]) for k in found}
        return [it for it in items if id(it) not in taken]

    def take_palettes(self, wanted) -> int:
        """Copy other searches' palettes for the (layer, format) pairs in ``wanted`` this search lacks."""
        if not self.enabled:
            return 0
        have = self.storage.palettes(self.search_id)
        keys = {self.palette_key(layer, bits): (layer, bits) for layer, bits in wanted if (layer, bits) not in have}
        found = find_palettes(self.storage, keys, exclude=self.search_id)
        if found:
            copy_results(self.storage, self.search_id, [], [], list(found.values()))
        return len(found)
