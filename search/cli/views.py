"""Everything the command line shows about searches, each view rendered by one function from the
plain dicts of search.read_models (which the service returns too): local and remote mode
print the same thing."""
from __future__ import annotations

import json
from typing import Iterable, Optional

import typer
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table

from search.cli.console import err, fail, fmt, out
from search.cli.coreml_view import bundle_lines, coreml_line


def print_json(data) -> None:
    print(json.dumps(data, indent=2, default=str))


def fetched(p: dict | None) -> str:
    """Bytes of weights fetched while preparing: '1234.5/6789.0 MB' ('' once prepared)."""
    if not p:
        return ""
    total = f"/{p['total_bytes'] / 1e6:.1f}" if p.get("total_bytes") else ""
    return f"{p['done_bytes'] / 1e6:.1f}{total} MB"


def tail(text: str, width: int) -> str:
    """``text`` in at most ``width`` characters, keeping its end (a model path's end names it)."""
    return text if len(text) <= width else "…" + text[len(text) - width + 1:]


MODEL_MIN = 12  # the model column is shortened down to this many characters (its tail), never less


def _preparing(p: dict | None) -> str:
    """The list's short form of the fetch progress (`search status` shows the bytes)."""
    if not p:
        return ""
    if not p.get("total_bytes"):
        return f"{p['done_bytes'] / 1e6:.0f} MB"
    return f"{min(100, int(100 * p['done_bytes'] / p['total_bytes']))}%"


def searches_table(rows: list[dict], place: str) -> Table:
    """Users copy the id into every other command: it is never cut; a long model path is shown
    by its tail instead, so that the list fits the terminal (80 columns: 16 characters of it)."""
    def build(model_width: int) -> Table:
        table = Table(title=f"searches {place}", box=None, pad_edge=False, header_style="bold")
        for col in ("id", "model", "status", "phase", "evals", "created (UTC)"):
            table.add_column(col, no_wrap=True)
        for r in rows:
            phase = f"{r['phase']} {_preparing(r.get('preparing'))}".strip() if r["phase"] == "preparing" else r["phase"]
            if r.get("coreml"):  # the Core ML phase: recipes validated, MB shipped to the service
                c = r["coreml"]
                phase += f" coreml {c['status']} {c['validated']}/{c['recipes']} {c['shipped_mb']:.0f} MB"
            table.add_row(r["id"], tail(r["model"], model_width), r["status"], phase, str(r["evaluations"]),
                          r["created_at"][:16].replace("T", " "))
        return table

    widest = max((len(r["model"]) for r in rows), default=0)
    room = out.width - Measurement.get(out, out.options.update_width(10_000), build(0)).maximum
    return _never_cut(build(widest if widest <= room else max(MODEL_MIN, room)))


def recipe_table(info: dict) -> Table:
    """Recipes by falling size; the strategy column only when strategies are mixed (fits 80 columns)."""
    recipes = sorted(info.get("recipes", []), key=lambda r: -r["avg_bits"])
    baselines = info.get("baselines", {})
    mixed = len({r["strategy"] for r in recipes}) > 1
    table = Table(title=f"recipes of search {info['id']} ({tail(info['model'], 40)})")
    table.add_column("key", no_wrap=True)
    headers = (["strategy"] if mixed else []) + ["bits", "MB", "thr dB", "pred dB", "PSNR dB"]
    shots = {row["key"]: row for row in (info.get("gallery") or {}).get("rows", []) if row.get("images_done")}
    if shots:  # the gallery's image metrics beside the latent PSNR (docs/gallery.md)
        headers += ["img dB", "SSIM"]
    for col in headers:
        table.add_column(col, justify="left" if col == "strategy" else "right", no_wrap=True)
    pad = [""] if mixed else []
    for name in ("original", "linear_8bit", "linear_8bit_per_channel"):
        if name in baselines:
            table.add_row(f"[dim]{name}", *pad, "16.00" if name == "original" else "8.00", "", "", "",
                          f"{baselines[name]:.2f}", *_image_cells(shots, name, "linear_8bit"))
    for r in recipes:
        table.add_row(r["key"], *([r["strategy"]] if mixed else []), f"{r['avg_bits']:.2f}", f"{r['size_mb']:.2f}",
                      fmt(r.get("threshold")), fmt(r.get("predicted_psnr")),
                      f"{r['psnr']:.2f}" if r.get("psnr") is not None else "pending", *_image_cells(shots, r["key"]))
    return _never_cut(table)


def _image_cells(shots: dict, key: str, alias: str | None = None) -> list[str]:
    """Mean image PSNR (identical images: "same") and SSIM of a gallery row; [] without a gallery."""
    if not shots:
        return []
    row = shots.get(key) or (shots.get(alias) if key.startswith("linear_8bit") and alias else None)
    if row is None:
        return ["", ""]
    psnr = "same" if row["psnr_mean"] is None else f"{row['psnr_mean']:.2f}"
    return [psnr, f"{row['ssim_mean']:.4f}"]


def gallery_line(g: dict | None) -> None:
    """`search status`: where the gallery is, and the worst recipe by image PSNR."""
    if not g or not g.get("prompts"):
        return
    done = sum(r.get("images_done", 0) for r in g["rows"])
    total = len(g["rows"]) * len(g["prompts"])
    scored = [r for r in g["rows"] if r["psnr_mean"] is not None]
    worst = min(scored, key=lambda r: r["psnr_mean"]) if scored else None
    tail_ = (f"; lowest image PSNR {worst['psnr_mean']:.2f} dB ({worst['key']}, worst prompt {worst['worst_prompt']})"
             if worst else "")
    out.print(f"gallery {g['status']}: {done}/{total} images (image PSNR/SSIM vs float16 in the table; "
              f"search images ID -o DIR writes them){tail_}", highlight=False, soft_wrap=True)


def _never_cut(table: Table) -> Table:
    """Users copy search ids and recipe keys into other commands: a table wider than the terminal
    is drawn at its natural width (print it with `print_uncut`) instead of being cut to fit."""
    natural = Measurement.get(out, out.options.update_width(10_000), table).maximum
    if natural > out.width:
        table.width = natural
    return table


def print_uncut(table: Table) -> None:
    """Print without cropping lines at the terminal width (the terminal wraps them instead)."""
    out.print(table, crop=False)


def status(info: dict) -> None:
    """`search status`: header, counts, error, recipes, Core ML validations."""
    n, nb = info["candidates"], len(info["config"]["nbits"])
    pairs = info.get("pairs", n * nb)  # fewer where a group size does not divide a layer's channels
    m = info.get("measurements", {})
    out.print(f"search [bold]{info['id']}[/]  model {info['model']}  status [bold]{info['status']}[/]  phase "
              f"{info['phase']}", highlight=False)
    out.print(f"candidates {n} × formats {','.join(map(str, info['config']['nbits']))}: isolated "
              f"{m.get('isolated', 0)}/{pairs}, cumulative {m.get('cumulative', 0)}/{pairs}; pipeline runs stored {info['evaluations']}, "
              f"reused {info.get('reused', 0)}; "
              f"driver time {info['elapsed_s']:.1f} s", highlight=False)
    if info.get("preparing"):
        out.print(f"model weights fetched: {fetched(info['preparing']) or '0.0 MB'} (not yet fingerprinted)",
                  highlight=False)
    floor = info.get("eval_floor")
    if floor:
        level = "none (the probes' response is linear)" if floor["psnr"] is None else f"{floor['psnr']:.2f} dB"
        out.print(f"evaluation floor {level} ({floor['probes']} probes: one layer's float16 weights moved by 1 "
                  "or 4 ulps); taken out of each isolated noise power before summing", highlight=False)
    if m.get("candidate"):
        out.print(f"refinement: {m['candidate']} candidate recipes measured", highlight=False)
    if info.get("phases") is None and info.get("progress"):  # the service's detail: its progress file
        from search.phase_rows import phase_rows

        info = {**info, "phases": phase_rows(info["progress"])}
    phase_lines(info.get("phases") or [])
    if info.get("error"):
        out.print(f"[red]error:[/] {info['error']}", highlight=False)
    if info.get("coreml"):
        coreml_line(info["coreml"])
    if info.get("bundles"):
        bundle_lines(info["id"], info["bundles"])
    if info.get("coreai"):
        from search.cli.coreai_view import coreai_lines

        coreai_lines(info["id"], info["coreai"])
    gallery_line(info.get("gallery"))
    print_uncut(recipe_table(info))
    validations = search_validations(info)
    if validations is not None:
        print_uncut(validations)


def phase_lines(phases: list[dict]) -> None:
    """Each phase of the search's last run with its count and wall time (search.phase_rows: the
    rows the dashboard shows)."""
    if phases:
        out.print("phases: " + "; ".join(
            f"{p['label']} {p['done']}/{p['total'] if p['total'] is not None else '?'}"
            + (f" in {p['wall_s']:.1f} s" if p.get("wall_s") is not None else "") for p in phases),
            highlight=False, soft_wrap=True)


def run_ended(info: dict, ended: dict, where: str, resume_where: str) -> None:
    """How a search run (or the run it followed) ended: failed -> one red line and exit 1;
    stopped -> how to resume and exit 130; completed -> counts, the recipe table, what next.
    ``ended``: status, error, and this run's evaluations, reference_runs, first_result_s (when known)."""
    sid = info["id"]
    if ended["status"] == "failed":
        fail(f"search {sid} failed: {ended.get('error')}. Fix the cause, then: search resume {sid}{where}", 1)
    if ended["status"] != "completed":
        err.print(f"[yellow]{ended['status']}:[/] every result received is stored. Resume with:\n"
                  f"  search resume {sid}{resume_where}", highlight=False, soft_wrap=True)
        raise typer.Exit(130)
    this_run = (f"{ended['evaluations']} evaluations this run (+{ended['reference_runs']} reference runs)"
                if ended.get("evaluations") is not None else "")
    first = f"; first new result after {ended['first_result_s']:.1f} s" if ended.get("first_result_s") is not None else ""
    err.print(f"[green]search {sid} completed[/]: {this_run}{first}; {info['evaluations']} stored in total, "
              f"reused {info.get('reused', 0)}; {info['elapsed_s']:.1f} s of driver time", highlight=False)
    if ended.get("timings"):
        err.print("timings (wall s, after each evaluator's warm-up run): " + ", ".join(
            f"{phase} {seconds:.1f}" for phase, seconds in ended["timings"].items()), highlight=False)
    print_uncut(recipe_table(info))
    out.print(f"download: search download {sid} -o recipes.json{where}    plot: search plot {sid} -o psnr.png{where}",
              highlight=False, soft_wrap=True)  # a command is never wrapped mid-way, in a terminal or a log


TARGET_WORDS = {"avg_bits": "at most {:g} bits per weight", "size_mb": "at most {:g} MB",
                "psnr": "at least {:g} dB", "min_psnr": "at least {:g} dB"}


def target_text(target) -> str:
    """A recipe's stored target in words ('at most 5 bits per weight'), never a Python dict."""
    if not isinstance(target, dict):
        return "-" if target is None else str(target)
    words = [TARGET_WORDS[k].format(v) for k, v in target.items() if k in TARGET_WORDS and v is not None]
    return ", ".join(words) or "-"


def counts_text(counts: dict) -> str:
    """Per-phase counts in words ('cumulative 3, isolated 12'), never a Python dict."""
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"


def target_recipe_table(r: dict) -> Table:
    """`search recipe`: the optimal recipe for one target, predicted against measured."""
    table = Table(title=f"optimal recipe for {target_text(r['target'])}")
    for col in ("key", "avg bits", "size MB", "predicted PSNR dB", "measured PSNR dB", "|error| dB"):
        table.add_column(col, justify="left" if col == "key" else "right")
    predicted, measured = r.get("predicted_psnr"), r.get("psnr")
    error = abs(predicted - measured) if predicted is not None and measured is not None else None
    table.add_row(r["key"], f"{r['avg_bits']:.2f}", f"{r['size_mb']:.2f}", fmt(predicted), fmt(measured), fmt(error))
    if r.get("refined"):
        ref = r["refined"]
        table.caption = (f"refined with {ref['evals']} end-to-end measurement(s) from the {ref['start']} recipe; "
                         "starting points " + ", ".join(f"{k} {v:.2f} dB" for k, v in ref["start_psnr"].items()))
    return _never_cut(table)


# -- Core ML validations -----------------------------------------------------------------------
def _numeric(v: dict, measured) -> str:
    if v["numeric_psnr"] is None:
        return "[red]not run[/]" if v["numeric_ok"] is False else "-"
    mark = {True: "[green]ok[/]", False: "[red]FAIL[/]", None: "[dim]no measured PSNR[/]"}[v["numeric_ok"]]
    vs = f" vs {fmt(measured)}" if measured is not None else ""
    return f"{v['numeric_psnr']:.2f}{vs} {mark}"


def _runtime(v: dict) -> str:
    if v["runtime"]:
        return ", ".join(f"{unit} {psnr:.2f} dB" for unit, psnr in v["runtime"].items())
    return "[dim]not run[/]" if v["runtime_note"].startswith("not run") else f"[red]{escape(v['runtime_note'])}[/]"


def validation_table(title: str, rows: Iterable[tuple[dict, Optional[float]]]) -> Table:
    """rows: (a stored Validation as a dict, the recipe's measured PSNR or None)."""
    table = Table(title=title)
    table.add_column("recipe", no_wrap=True)  # a key is copied into other commands: never cut
    table.add_column("mlpackage", overflow="fold", min_width=12)
    table.add_column("size MB", justify="right")
    table.add_column("avg bits", justify="right")
    table.add_column("structural")
    table.add_column("numeric PSNR vs measured dB")
    table.add_column("runtime (Core ML)")
    for v, measured in rows:
        structural = "[green]ok[/]" if v["structural_ok"] else f"[red]FAIL[/] {escape(v['structural_detail'])}"
        table.add_row(escape(v["recipe_key"]), escape(v["mlpackage"]), f"{v['size_bytes'] / 1e6:.2f}",
                      f"{v['avg_bits']:.2f}", structural, _numeric(v, measured), _runtime(v))
    return _never_cut(table)


def search_validations(info: dict) -> Table | None:
    """The stored Core ML validations of a search (detail dict); None when nothing was applied."""
    validations = info.get("validations") or {}
    if not validations:
        return None
    measured = {r["key"]: r.get("psnr") for r in info.get("recipes", [])}
    return validation_table(f"Core ML validations of search {info['id']}",
                            [(v, measured.get(v["recipe_key"])) for v in validations.values()])
