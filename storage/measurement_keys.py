"""The key of a measurement across searches, computed here and nowhere else (docs/reuse.md).

Two searches that agree on a key get the same number, so a new search copies a stored value
instead of running the pipeline again. A key is the sha256 of

* ``KEY_VERSION``: bumped whenever code changes what a stored number would be (the protocol's
  arithmetic, the palette fit, the evaluator's patching), so old rows stop matching;
* the model: its denoiser fingerprint and resolved version (Hub id or path: the text encoders
  and scheduler it brings are not fingerprinted, see docs/reuse.md);
* every config field that changes a number (``VALUE_FIELDS``), and the compute dtype the
  evaluators actually used (``--precision auto`` is float32 on a CPU, float16 on a GPU);
* what the item measures: its phase and (layer, format) pairs (for a cumulative point the set of
  layers its curve's order has palettized so far, at the curve's format), a floor probe's ulps,
  a baseline's name (classic's 8-bit baseline also covers the candidate list).

The device class (cuda, mps, cpu) is stored beside the key, not in it: searches match on it
unless ``--reuse-across-devices``. Pure: plain values in, hex digests out (no SQL, no torch).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

KEY_VERSION = 1

# SearchConfig fields that change a measured number: each is part of the key.
VALUE_FIELDS = ("protocol", "prompts", "images", "seed", "steps", "resolution", "guidance_scale", "batch_size",
                "default_nbits", "loras", "config_dir")  # the last two: a single-file checkpoint's pipeline
# The other SearchConfig fields, and why they are not: the test suite checks the two lists cover
# SearchConfig exactly, so a new field needs a decision here.
NOT_VALUE_FIELDS = {
    "precision": "replaced by the dtype the evaluators computed in",
    "min_size": "chooses the candidates; only classic's 8-bit baseline depends on them (its key holds them)",
    "nbits": "chooses which formats are measured", "anchors": "chooses which formats are measured",
    "evals": "chooses which pairs are measured", "curves": "chooses whether curves are measured",
    "num_recipes": "recipes only", "strategy": "recipes only", "targets": "recipes only",
    "refine_evals": "chooses how many candidates are measured",
    "prefix_reuse": "bit-identical execution switch", "compile": "execution switch",
    "reuse": "this feature's own switch", "reuse_across_devices": "this feature's own switch",
    "gallery": "images after the recipes, not measurements", "gallery_steps": "gallery only",
    "gallery_resolution": "gallery only",
    "target": "what --apply builds (Core ML or Core AI) and which formats are allowed; not how one is measured",
}
REUSABLE_PHASES = ("baseline", "floor", "isolated", "cumulative", "candidate", "recipe")


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def _pairs(assignment) -> list[list[str]]:
    """(layer, format) pairs as a sorted list of [layer, spelling]: the set palettized together."""
    return sorted([str(layer), str(fmt)] for layer, fmt in assignment)


@dataclass(frozen=True)
class KeySpace:
    """What all of one search's keys share; build it with ``KeySpace.of``."""

    protocol: str     # the protocol's name: classic's 8-bit baseline covers the candidates only
    values: str       # digest of the version, model, value fields and dtype
    palettes: str     # digest of the version, model and protocol (a palette does not depend on prompts)
    candidates: str   # digest of the candidate layer names

    @classmethod
    def of(cls, *, fingerprint: str, model_version: str, config: dict, dtype: str, candidates) -> "KeySpace":
        """``config``: a SearchConfig's ``to_dict()``; ``dtype``: the evaluators' compute dtype(s)."""
        model = [KEY_VERSION, fingerprint, model_version]
        values = {f: config.get(f) for f in VALUE_FIELDS}
        return cls(protocol=str(config.get("protocol")), values=_digest(model + [values, dtype]),
                   palettes=_digest(model + [config.get("protocol")]), candidates=_digest(sorted(candidates)))

    def measurement(self, phase: str, *, name: str | None = None, layer: str | None = None, bits=None,
                    position: int | None = None, assignment=(), linear8: bool = False) -> str | None:
        """The key of one work item's result (None: not a reusable phase, e.g. a histogram)."""
        if phase == "baseline":
            ident = ["baseline", name, self.candidates if linear8 and self.protocol == "classic" else None]
        elif phase == "floor":
            ident = ["floor", layer, position or 1]
        elif phase == "isolated":
            ident = ["isolated", _pairs(assignment or ((layer, bits),))]
        elif phase == "cumulative":
            ident = ["cumulative", _pairs(assignment)]
        elif phase in ("candidate", "recipe"):  # the same bit map measured the same way (pristine weights)
            ident = ["bitmap", _pairs(assignment)]
        else:
            return None
        return _digest([self.values, ident])

    def palette(self, layer: str, bits) -> str:
        """The key of a layer's palette at a format: its k-means depends on the weight alone."""
        return _digest([self.palettes, "palette", str(layer), str(bits)])
