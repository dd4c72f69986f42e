"""`search apply ID --server URL --here -o DIR`: the Core ML stage on this machine (a Mac outside
the Ray cluster) for a search on a service. The recipes, the model's identity and the search's
exact palettes come over HTTP (read-only routes; each palette checked against its stored digest),
the Core ML worker runs in this process (`workers.coreml.task.run_job`: convert, palettize,
validate, Core ML prediction on macOS), and the validations go back to the service, where
`search status` shows them. The model is resolved here (Hub id or built-in; a path on the
server's disk cannot be)."""
from __future__ import annotations

import socket
import tempfile
from pathlib import Path

from search.cli.console import CliError


def _palettes(client, sid: str, wanted: list[dict]) -> dict:
    from common.formats import PaletteFormat
    from workers.palettize import load_palette

    out = {}
    with tempfile.TemporaryDirectory(prefix="mbp-palettes-") as tmp:
        for i, p in enumerate(wanted):
            path = Path(tmp) / f"{i}.npz"
            path.write_bytes(client.palette_bytes(sid, p["layer"], p["bits"]))
            palette = load_palette(path)
            if palette.digest != p["digest"]:
                raise CliError(f"the palette of {p['layer']} at {p['bits']} arrived damaged (digest differs); "
                               "try again")
            out[(p["layer"], PaletteFormat.of(p["bits"]))] = palette
    return out


def apply_here(client, search_id: str, recipe: str | None, out_dir: Path, mlpackage: Path | None):
    """Apply the chosen recipes here, post the validations; returns (JobResult, the service's view)."""
    from common.formats import is_palettized, recipe_formats
    from search.driver.coreml_jobs import config_settings, select_keys
    from workers.coreml.task import CoreMLJob, RecipeJob, run_job
    from workers.models import model_options

    info = client.here_job(search_id)
    sid = info["id"]
    by_key = {r["key"]: r for r in info["recipes"]}
    keys = select_keys(by_key, recipe or "all", f"search {sid}")
    bits = {k: recipe_formats(by_key[k]["bits"]) for k in keys}
    used = {(l, str(b.to_json())) for k in keys for l, b in bits[k].items() if is_palettized(b)}
    wanted = [p for p in info["palettes"] if (p["layer"], p["bits"]) in used]
    if missing := [p["layer"] for p in wanted if p["digest"] is None]:
        raise CliError(f"search {sid} stores no palette for {len(missing)} recipe layers; resume it first")
    job = CoreMLJob("apply", sid, info["model"], info["fingerprint"], config_settings(info["config"]),
                    tuple(RecipeJob(k, bits[k], by_key[k]["avg_bits"], by_key[k]["psnr"]) for k in keys),
                    _palettes(client, sid, wanted), "search", str(out_dir.expanduser().resolve()),
                    str(mlpackage.expanduser().resolve()) if mlpackage else None,
                    model_options=model_options(info["config"]))
    result = run_job(job)
    node = f"{socket.gethostname()} (--here)"
    rows = [dict(recipe_key=o.key, mlpackage=o.mlpackage, size_bytes=o.size_bytes, avg_bits=o.avg_bits,
                 structural_ok=o.structural_ok, structural_detail=o.structural_detail, numeric_psnr=o.numeric_psnr,
                 numeric_ok=o.numeric_ok, runtime=o.runtime, runtime_note=o.runtime_note, node=node)
            for o in result.outcomes]
    return result, client.post_validations(sid, rows), rows

