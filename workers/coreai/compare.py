"""The recipe against Apple's ``4bit`` preset on the same model and the same protocol.

Apple's only compression for diffusion denoisers is INT4 per-block-32 symmetric on weights of at
least 32,768 elements (4 bits + one float16 scale per 32 weights = 4.5 bits per quantized weight).
The preset is exported here exactly as Apple's exporter applies it (``export.quantize_4bit``),
run on the same Core AI runtime in the same signal, and both assets are sized from what Core AI
says they store (``AIModelAsset.summary``: elements per storage type), so bits per weight count
LUTs and scales as the device does: stored bits / the denoiser's weights.

Apple's other preset, ``none`` (the float16 denoiser, nothing compressed), run the same way is the
runtime's float16 floor (`float16_floor`): what its arithmetic alone costs against the search's
reference, which the bundle's runtime check allows for (`workers.coreai.bundle.runtime_check`).
"""
from __future__ import annotations

import re
import tempfile
import weakref
from pathlib import Path

_TYPE = re.compile(r"(?i)^(b?float|u?int)(\d+)")
# Apple's presets measured once per evaluator: {evaluator: {(preset, ptype, hw, tokens): result}}. Both
# are the same for every recipe of a search, so a phase building many recipes exports each once.
_PRESETS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _per_evaluator(ev, key: tuple, compute):
    known = _PRESETS.setdefault(ev, {})
    if key not in known:
        known[key] = compute()
    return known[key]


def storage_bits(asset_path) -> tuple[int, dict[str, int]]:
    """(total stored bits of the asset's constants, elements per storage type), from Core AI."""
    from coreai.authoring import AIModelAsset

    summary = AIModelAsset.load(str(asset_path)).summary(include_statistics=True)
    counts = dict(summary.storage_types) if summary is not None else {}
    total = 0
    for name, n in counts.items():
        m = _TYPE.match(name)
        if m is None:
            raise ValueError(f"unknown Core AI storage type {name!r}")
        total += int(m.group(2)) * int(n)
    return total, counts


def asset_bytes(asset_path) -> int:
    return sum(p.stat().st_size for p in Path(asset_path).rglob("*") if p.is_file())


def row(name: str, asset_path, weights: int, psnr: float, extra: dict | None = None) -> dict:
    bits, counts = storage_bits(asset_path)
    return {"name": name, "bits_per_weight": bits / weights, "asset_bytes": asset_bytes(asset_path),
            "psnr": psnr, "storage": counts, **(extra or {})}


def comparison(ev, ptype: str, hw, recipe_asset: Path, luts, job, recipe_psnr: float, tokens: int | None = None) -> dict:
    """{rows: [recipe, 4bit], delta_db, weights}: measured on the Core AI runtime."""

    weights = sum(p.numel() for p in ev.denoiser.parameters())
    rows = [row(f"recipe {job.recipe_key}", recipe_asset, weights, recipe_psnr,
                {"search_avg_bits": job.avg_bits, "palettized_layers": len(luts)})]
    rows.append(dict(_per_evaluator(ev, ("4bit", ptype, tuple(hw), tokens),
                                    lambda: _preset_4bit(ev, ptype, hw, weights, tokens))))
    return {"weights": weights, "rows": rows, "delta_db": rows[0]["psnr"] - rows[1]["psnr"],
            "protocol": "the search's signal, Core AI runtime (Linux CPU) vs the search's diffusers reference"}


def _preset_4bit(ev, ptype: str, hw, weights: int, tokens: int | None) -> dict:
    """The comparison's row of Apple's 4bit preset: exported as Apple's exporter applies it, run in the
    search's signal on the Core AI runtime."""
    from workers.coreai.denoiser import export_denoiser, measure_asset

    with tempfile.TemporaryDirectory(prefix="mbp-coreai-4bit-") as tmp:
        preset = Path(tmp) / "Unet-4bit.aimodel"
        export_denoiser(ev, ptype, hw, None, preset, quantize=True, tokens=tokens)
        psnr, _, _ = measure_asset(ev, preset)
        quantized = sum(n for t, n in storage_bits(preset)[1].items() if t.lower() in ("int4", "uint4"))
        return row("Apple 4bit preset", preset, weights, psnr,
                   {"quantized_weights": quantized, "quantized_bits_per_weight": 4.5 if quantized else None})


def float16_floor(ev, ptype: str, hw, tokens: int | None = None) -> float:
    """PSNR of Apple's ``none`` preset (the float16 denoiser) on the Core AI runtime in the search's
    signal: the most any asset of this model can measure there. The same for every recipe of a
    search, so kept per evaluator (a phase building many recipes exports and runs it once)."""
    from workers.coreai.denoiser import export_denoiser, measure_asset

    def measure() -> float:
        with tempfile.TemporaryDirectory(prefix="mbp-coreai-none-") as tmp:
            preset = Path(tmp) / "Unet-none.aimodel"
            export_denoiser(ev, ptype, hw, None, preset, tokens=tokens)
            return measure_asset(ev, preset)[0]

    return _per_evaluator(ev, ("none", ptype, tuple(hw), tokens), measure)
