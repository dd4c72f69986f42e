"""Reading a search's stored measurements back as plain tables and as an Apple report."""
from __future__ import annotations

from dataclasses import dataclass, field

from common.formats import LayerSizes, PaletteFormat, fits
from search.recipes.apple_json import SearchReport
from search.recipes.apple_rule import Recipe, cumulative_order
from storage import Measurement, Search, Storage


@dataclass(frozen=True)
class Tables:
    sizes: LayerSizes                                  # candidate -> numel, module order (+ channels)
    isolated: dict[PaletteFormat, dict[str, Measurement]]    # format -> layer -> measurement
    cumulative: dict[PaletteFormat, dict[int, Measurement]]  # format -> position (1-based) -> measurement
    baselines: dict[str, float]
    baseline_per_prompt: dict[str, tuple[float, ...]]
    floor_probes: dict[tuple[str, int], Measurement] = field(default_factory=dict)  # (layer, ulps) -> probe
    candidates: dict[str, Measurement] = field(default_factory=dict)    # key -> refinement candidate
    recipes: tuple[tuple[dict, float], ...] = ()  # (bit map, measured PSNR) of every measured recipe

    def isolated_psnr(self, bits: int) -> dict[str, float]:
        return {layer: m.psnr for layer, m in self.isolated.get(bits, {}).items()}

    def order(self, bits: int) -> list[str]:
        """Cumulative order: descending isolated PSNR. Needs the full isolated row."""
        return cumulative_order(self.isolated_psnr(bits), list(self.sizes))

    def cumulative_by_layer(self, bits: int) -> dict[str, float]:
        return {m.layer: m.psnr for m in self.cumulative.get(bits, {}).values()}


def probe_ulps(m: Measurement) -> int:
    """How far a floor probe moved its layer's weights: stored as its position (None: 1 ulp)."""
    return m.position or 1


def load_tables(storage: Storage, search_id: str) -> Tables:
    layers = storage.layers(search_id)
    sizes = LayerSizes({l.name: l.numel for l in layers}, {l.name: l.shape[0] for l in layers})
    isolated: dict[int, dict[str, Measurement]] = {}
    cumulative: dict[int, dict[int, Measurement]] = {}
    probes: dict[tuple[str, int], Measurement] = {}
    candidates: dict[str, Measurement] = {}
    for m in storage.measurements(search_id):
        if m.phase == "isolated":
            isolated.setdefault(m.bits, {})[m.layer] = m
        elif m.phase == "cumulative":
            cumulative.setdefault(m.bits, {})[m.position] = m
        elif m.phase == "floor":
            probes[m.layer, probe_ulps(m)] = m
        elif m.phase == "candidate":
            candidates[m.key] = m
    stored = storage.baselines(search_id)
    baselines = {name: b.psnr for name, b in stored.items()}
    measured = tuple((r.bits, r.psnr) for r in storage.recipes(search_id) if r.psnr is not None)
    return Tables(sizes, isolated, cumulative, baselines, {name: b.per_prompt for name, b in stored.items()},
                  probes, candidates, measured)


def weight_mse(storage: Storage, search_id: str) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    for (layer, bits), info in storage.palettes(search_id).items():
        out.setdefault(bits, {})[layer] = info.weight_mse
    return out


def build_report(storage: Storage, search: Search) -> SearchReport:
    t = load_tables(storage, search.id)
    nbits = [PaletteFormat.of(b) for b in search.config["nbits"]]
    stored = storage.recipes(search.id)
    recipes = [(Recipe(r.key, r.bits, r.avg_bits, r.size_mb, r.threshold, r.strategy), r.psnr) for r in stored]
    baselines = dict(t.baselines)
    complete = {b for b in nbits if len(t.isolated.get(b, {})) == sum(fits(t.sizes, l, b) for l in t.sizes)}
    order = {b: t.order(b) for b in nbits if t.cumulative.get(b) and b in complete}
    cumulative = {b: {m.layer: list(m.per_prompt) for _, m in sorted(t.cumulative.get(b, {}).items())}
                  for b in nbits if t.cumulative.get(b)}
    single = {b: {layer: list(t.isolated[b][layer].per_prompt) for layer in t.sizes if layer in t.isolated[b]}
              for b in nbits if t.isolated.get(b)}  # candidate (module) order, as Apple's single_layer
    extra = {
        "search_id": search.id,
        "model": search.model,
        "model_location": search.model_location,
        "fingerprint": search.fingerprint,
        "config": search.config,
        "status": search.status,
        "thresholds": [r.threshold for r in stored if r.threshold is not None],
        "recipe_details": {r.key: {"strategy": r.strategy, "threshold": r.threshold, "avg_bits": r.avg_bits,
                                   "size_mb": r.size_mb, "predicted_psnr": r.predicted_psnr,
                                   "per_prompt": list(r.per_prompt) if r.per_prompt else None} for r in stored},
        "timings": {"created_at": search.created_at.isoformat() + "Z",
                    "finished_at": search.finished_at.isoformat() + "Z" if search.finished_at else None,
                    "elapsed_s": round(search.elapsed_s, 3), "evaluations": search.evaluations},
    }
    protocol = search.config.get("protocol", "classic")  # stored before protocols existed: classic
    return SearchReport(model_version=search.model_version, baselines=baselines, recipes=recipes,
                        single_layer=single, cumulative=cumulative, order=order, sizes=t.sizes, extra=extra,
                        protocol=protocol)
