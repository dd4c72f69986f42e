"""A stored search, read back as what users see: plain JSON-ready dicts (a list row, the status
detail) and the two downloads (Apple's JSON, the PSNR plot). One definition for the service's
responses and for the command line's local mode, so both show the same thing.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

from common.clock import utcnow
from common.formats import PaletteFormat
from storage import Search, Storage
from storage.records import STALE_AFTER_S


def iso(t: datetime | None) -> str | None:
    """A stored (naive UTC) time as ISO 8601 with a Z."""
    return t.isoformat() + "Z" if t else None


def search_summary(storage: Storage, s: Search, now: datetime | None = None) -> dict:
    """A row of `search list` / ``GET /searches``."""
    return {"id": s.id, "model": s.model, "model_version": s.model_version,
            "status": s.effective_status(now or utcnow()), "phase": s.phase, "created_at": iso(s.created_at),
            "evaluations": s.evaluations, "reused": s.reused,  # copied from other searches (docs/reuse.md)
            "measurements": storage.count_measurements(s.id), "error": s.error,
            "preparing": preparing(s), "coreml": coreml_progress(storage, s)}


def coreml_progress(storage: Storage, s: Search) -> dict | None:
    """The Core ML stage asked of a search (None: none): its job's status and how far it got
    (recipes applied, validated, failed; MB shipped to the head). Never a file path of the head."""
    from storage.coreai_store import job_target
    from storage.coreml_store import CoreMLStore

    store = CoreMLStore(storage)
    job = store.job(s.id)
    if job is None:
        return None
    packages, validations = store.packages(s.id), storage.validations(s.id)
    keys = job.keys or tuple(r.key for r in storage.recipes(s.id))
    shipped = {k: p for k, p in packages.items() if k in keys and p.status == "shipped"}
    ok = [k for k in shipped if k in validations and validations[k].structural_ok and validations[k].numeric_ok is not False]
    status = job.status
    if status == "running" and (utcnow() - job.updated_at).total_seconds() > STALE_AFTER_S:
        status = "interrupted"  # its driver died without a word
    return {"status": status, "error": job.error, "apply": job.recipes, "coreml_node": job.coreml_node,
            "target": job_target(storage, s),  # coreai: it builds Core AI folders (the request's or the search's)
            "node": job.node, "seconds": job.seconds, "recipes": len(keys), "applied": len(shipped),
            "validated": len(ok), "failed": sorted(k for k in keys if k in packages and k not in ok),
            "shipped_mb": sum(p.size_bytes for p in shipped.values()) / 1e6,
            "packages": {k: {"status": p.status, "detail": p.detail, "size_bytes": p.size_bytes, "sha256": p.sha256,
                             "node": p.node, "ship_s": p.ship_s} for k, p in packages.items()}}


def bundles(storage: Storage, s: Search) -> dict:
    """The Resources folders built for a search's recipes (`search bundle`, the Core ML phase):
    status (built: a folder where `search bundle` wrote it; shipped: a zip the service keeps, to
    download; failed), the checks or why, the folder's total size (bundle.json's), the zip's size
    and sha256 when shipped. Never a file path."""
    from storage.coreml_store import CoreMLStore

    return {k: {"status": b.status, "detail": b.detail, "total_bytes": b.total_bytes, "zip_bytes": b.zip_bytes,
                "sha256": b.sha256, "node": b.node, "seconds": b.seconds, "options": b.options}
            for k, b in CoreMLStore(storage).bundles(s.id).items()}


def coreai_bundles(storage: Storage, s: Search) -> dict:
    """The Core AI folders of a search's recipes (issue 36: `search bundle --target coreai`, or the
    Core ML phase of a search submitted with ``--target coreai``): status, the checks (LUTs bit for
    bit, runtime PSNR, the search's measured PSNR, their difference, ok), the comparison with
    Apple's 4bit preset (rows: name, bits/weight, asset bytes, PSNR; delta dB), the zip's size and
    sha256 when shipped. Never a file path."""
    from storage.coreai_store import CoreAIStore

    out = {}
    for k, b in CoreAIStore(storage).bundles(s.id).items():
        comp = b.comparison
        out[k] = {"status": b.status, "detail": b.detail, "ok": b.ok, "luts_ok": b.luts_ok, "luts_detail": b.luts_detail,
                  "runtime_psnr": b.runtime_psnr, "measured_psnr": b.measured_psnr, "difference_db": b.difference_db,
                  "runtime_ok": b.runtime_ok, "floor_psnr": b.floor_psnr,  # the float16 floor, if measured
                  "total_bytes": b.total_bytes, "zip_bytes": b.zip_bytes,
                  "sha256": b.sha256, "node": b.node, "seconds": b.seconds,
                  "comparison": None if comp is None else {
                      "delta_db": comp["delta_db"], "weights": comp["weights"],
                      "rows": [{"name": r["name"], "bits_per_weight": r["bits_per_weight"],
                                "asset_bytes": r["asset_bytes"], "psnr": r["psnr"]} for r in comp["rows"]]}}
    return out


def preparing(s: Search) -> dict | None:
    """While a search's model is being fetched: bytes fetched and in all (total 0: not known yet)."""
    if s.prepared:
        return None
    return {"done_bytes": s.prepare_done or 0, "total_bytes": s.prepare_total or 0}


def format_pairs(storage: Storage, s: Search) -> int:
    """(layer, format) pairs a search measures: every candidate in every format whose group size
    divides its output channels (per-tensor formats fit every layer)."""
    formats = [PaletteFormat.of(b) for b in s.config.get("nbits", ())]
    return sum(f.fits(layer.shape[0]) for layer in storage.layers(s.id) for f in formats)


def phase_counts(storage: Storage, s: Search, pairs: int) -> dict:
    """Absolute per-phase progress from the database (for searches without a progress file)."""
    counts = storage.count_measurements(s.id)
    recipes = storage.recipes(s.id)
    baselines = len(storage.baselines(s.id))
    full = s.config.get("evals", "full") == "full"
    return {
        "palettes": {"done": len(storage.palettes(s.id)), "total": pairs},
        "isolated": {"done": counts.get("isolated", 0) + baselines, "total": pairs + 2 if full else None},
        "cumulative": {"done": counts.get("cumulative", 0), "total": pairs if s.config.get("curves") else 0},
        "recipes": {"done": sum(1 for r in recipes if r.psnr is not None), "total": len(recipes)},
    }


def search_detail(storage: Storage, s: Search, now: datetime | None = None) -> dict:
    """`search status` / ``GET /searches/{id}``: the summary plus config, baselines, recipes,
    Core ML validations, bundles and per-phase counts."""
    info = search_summary(storage, s, now)
    candidates, pairs = len(storage.layers(s.id)), format_pairs(storage, s)
    info.update(
        config=s.config, fingerprint=s.fingerprint, elapsed_s=s.elapsed_s, candidates=candidates, pairs=pairs,
        updated_at=iso(s.updated_at), finished_at=iso(s.finished_at),
        baselines={k: b.psnr for k, b in storage.baselines(s.id).items()},
        recipes=[{"key": r.key, "strategy": r.strategy, "avg_bits": r.avg_bits, "size_mb": r.size_mb,
                  "threshold": r.threshold, "predicted_psnr": r.predicted_psnr, "psnr": r.psnr, "target": r.target}
                 for r in storage.recipes(s.id)],
        validations={k: asdict(v) for k, v in storage.validations(s.id).items()},
        bundles=bundles(storage, s),
        coreai=coreai_bundles(storage, s),
        counts=phase_counts(storage, s, pairs),
        eval_floor=eval_floor(storage, s),
        gallery=gallery(storage, s, images=False),
    )
    return info


def gallery(storage: Storage, s: Search, running: bool = False, images: bool = True) -> dict:
    """The gallery of a search (docs/gallery.md): status missing | running | done, the prompts, and
    one row per float16 / linear_8bit / recipe with its image PSNR/SSIM mean and worst prompt (and,
    with ``images``, each image's metrics, sha256 and URL). Never a file path."""
    from search.driver.gallery_phase import PHASE, gallery_rows
    from storage.gallery_store import GalleryStore

    prompts = list(s.config.get("prompts") or [])
    stored = {(r.row, r.prompt): r for r in GalleryStore(storage).images(s.id)}
    bits = {r.key: r.avg_bits for r in storage.recipes(s.id)}
    rows = []
    for key, _, _ in gallery_rows(storage, s.id):
        mine = [stored[(key, i)] for i in range(len(prompts)) if (key, i) in stored]
        finite = [r for r in mine if r.psnr is not None]
        row = {"key": key, "avg_bits": bits.get(key), "images_done": len(mine),
               "psnr_mean": sum(r.psnr for r in finite) / len(finite) if finite else None,
               "ssim_mean": sum(r.ssim for r in mine) / len(mine) if mine else None,
               "worst_prompt": min(finite, key=lambda r: (r.psnr, r.prompt)).prompt if finite else None}
        if images:
            row["images"] = [{"prompt": r.prompt, "psnr": r.psnr, "ssim": r.ssim, "sha256": r.sha256,
                              "url": f"/searches/{s.id}/images/{key}/{r.prompt}.png"} for r in mine]
        rows.append(row)
    complete = bool(prompts) and all(r["images_done"] == len(prompts) for r in rows)
    active = s.effective_status(utcnow()) in ("pending", "running", "cancelling") and s.phase == PHASE
    status = "done" if complete else "running" if running or active else "missing"
    return {"status": status, "prompts": prompts, "rows": rows}


def eval_floor(storage: Storage, s: Search) -> dict | None:
    """The evaluation floor the noise model takes out (``strategy.probes_floor``): mean over prompts
    of its dB (None: no floor), and the probe count."""
    import numpy as np

    from search.recipes.strategy import probes_floor

    probes = storage.measurements(s.id, phase="floor")
    power = probes_floor(probes)
    if power is None:
        return None
    with np.errstate(divide="ignore"):
        psnr = float(np.mean(-10 * np.log10(power)))
    return {"psnr": psnr if np.isfinite(psnr) else None, "probes": len(probes)}


def recipes_json(storage: Storage, s: Search) -> str:
    """The recipes and measurements in Apple's JSON format (strict JSON, one trailing newline)."""
    from search.recipes.apple_json import to_apple_json
    from search.recipes.tables import build_report

    report = build_report(storage, s)
    shots = gallery(storage, s, images=False)
    if any(r["images_done"] for r in shots["rows"]):  # the gallery's image metrics (docs/gallery.md)
        report.extra["gallery"] = {r["key"]: {"image_psnr_mean": r["psnr_mean"], "image_ssim_mean": r["ssim_mean"],
                                              "worst_prompt": r["worst_prompt"], "images": r["images_done"]}
                                   for r in shots["rows"]}
    return json.dumps(to_apple_json(report), indent=2, allow_nan=False) + "\n"


def plot_png(storage: Storage, s: Search) -> bytes:
    """PSNR vs model-size reduction as PNG bytes."""
    from search.recipes.plot import plot_report
    from search.recipes.tables import build_report

    with tempfile.TemporaryDirectory(prefix="mbp-plot-") as tmp:
        return plot_report(build_report(storage, s), Path(tmp) / "psnr.png").read_bytes()


__all__ = ["iso", "search_summary", "coreml_progress", "bundles", "coreai_bundles", "preparing", "search_detail", "phase_counts",
           "recipes_json", "plot_png"]
