"""`search apply` and `search validate`: the Core ML stage on the command line.

The lead registers them in search.cli (``app.command("apply")(apply_cmd)``,
``app.command("validate")(validate_cmd)``); ``validation_table`` is for ``search status``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from search.cli.app import CliError, DbOption, _shutdown_ray, app, err, guarded, open_storage, out

COREML_NODE_HELP = ("where the Core ML worker runs: 'coreml' = a node started with the custom resource coreml "
                    "(a Mac), 'any' = any node (everything but Core ML prediction) "
                    "[default: any when Ray runs embedded on Linux, else coreml]")
MODEL_HELP = ("torch model whose weights the .mlpackage holds, when it is not the search's model (e.g. a "
              "fine-tuned variant): layer names and LUTs then come from it [default: the search's model]")
RecipeOption = typer.Option(None, "--recipe", help="recipe key, or 'all'")
ModelOption = typer.Option(None, "--model", help=MODEL_HELP)
NodeOption = typer.Option(None, "--coreml-node", help=COREML_NODE_HELP)
RayOption = typer.Option(None, "--ray-address", envvar="RAY_ADDRESS",
                         help="join a running Ray cluster instead of starting a local one")


def _fmt_psnr(value) -> str:
    return f"{value:.2f}" if value is not None else "-"


def _numeric(v, measured) -> str:
    if v.numeric_psnr is None:
        return "[red]not run[/]" if v.numeric_ok is False else "-"
    mark = {True: "[green]ok[/]", False: "[red]FAIL[/]", None: "[dim]no measured PSNR[/]"}[v.numeric_ok]
    vs = f" vs {_fmt_psnr(measured)}" if measured is not None else ""
    return f"{v.numeric_psnr:.2f}{vs} {mark}"


def _runtime(v) -> str:
    if v.runtime:
        return ", ".join(f"{unit} {psnr:.2f} dB" for unit, psnr in v.runtime.items())
    return "[dim]not run[/]" if v.runtime_note.startswith("not run") else f"[red]{escape(v.runtime_note)}[/]"


def _table(title: str, rows) -> Table:
    """rows: (Validation, measured PSNR or None)."""
    table = Table(title=title)
    table.add_column("recipe", overflow="fold", min_width=12)
    table.add_column("mlpackage", overflow="fold", min_width=12)
    table.add_column("size MB", justify="right")
    table.add_column("avg bits", justify="right")
    table.add_column("structural")
    table.add_column("numeric PSNR vs measured dB")
    table.add_column("runtime (Core ML)")
    for v, measured in rows:
        structural = "[green]ok[/]" if v.structural_ok else f"[red]FAIL[/] {escape(v.structural_detail)}"
        table.add_row(escape(v.recipe_key), escape(v.mlpackage), f"{v.size_bytes / 1e6:.2f}", f"{v.avg_bits:.2f}", structural,
                      _numeric(v, measured), _runtime(v))
    return table


def validation_table(storage, search) -> Table | None:
    """The stored validations of a search (for `search status`); None when nothing was applied."""
    rows = storage.validations(search.id)
    if not rows:
        return None
    measured = {r.key: r.psnr for r in storage.recipes(search.id)}
    return _table(f"Core ML validations of search {search.id}",
                  [(v, measured.get(v.recipe_key)) for v in rows.values()])


def _report(report) -> None:
    for note in report.notes:
        err.print(f"[yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)
    where = f"on node {report.node}"
    if report.base_mlpackage:
        where += f"; base model {report.base_mlpackage}{' (cached)' if report.base_cached else ''}"
    err.print(escape(where), highlight=False, soft_wrap=True)
    measured = {o.key: o.measured_psnr for o in report.outcomes}
    for v in report.validations:
        out.print(escape(f"{v.recipe_key}: {v.mlpackage} ({v.size_bytes / 1e6:.2f} MB, {v.avg_bits:.2f} bits/weight)"),
                  highlight=False, soft_wrap=True)
    out.print(_table(f"Core ML recipes of search {report.search_id}",
                     [(v, measured.get(v.recipe_key)) for v in report.validations]))
    notes = {v.runtime_note for v in report.validations if not v.runtime}
    for note in sorted(notes):
        out.print(escape(f"runtime validation {note}"), highlight=False, soft_wrap=True)
    if report.failed:
        err.print(f"[bold red]validation failed:[/] {escape(', '.join(report.failed))}", highlight=False)
        raise typer.Exit(1)


def _call(fn, **kwargs):
    """Run ``fn``; ApplyError becomes the CLI's one red line; Ray stops if this command started it."""
    import ray

    from search.driver.coreml_jobs import ApplyError

    started_here = not ray.is_initialized()
    try:
        return fn(**kwargs)
    except ApplyError as exc:
        raise CliError(str(exc)) from None
    finally:
        if started_here:
            _shutdown_ray()


@guarded
def apply_cmd(
    search_id: str = typer.Argument(..., help="search id (or a unique prefix)"),
    output: Path = typer.Option(..., "-o", "--output", help="directory for the .mlpackage files"),
    recipe: Optional[str] = RecipeOption,
    mlpackage: Optional[Path] = typer.Option(None, "--mlpackage", help="the float16 UNet .mlpackage to compress "
                                             "(e.g. from Apple's torch2coreml) [default: convert the search's UNet]"),
    recipe_file: Optional[Path] = typer.Option(None, "--recipe-file", help="recipes in Apple's JSON format "
                                               "instead of the search's (LUTs from k-means on the model's weights)"),
    model: Optional[str] = ModelOption,
    coreml_node: Optional[str] = NodeOption,
    ray_address: Optional[str] = RayOption,
    db: Optional[Path] = DbOption,
) -> None:
    """Palettize a Core ML UNet with a recipe's exact LUTs, one .mlpackage per recipe, and validate it."""
    from search.driver.coreml_jobs import apply_recipes

    storage = open_storage(db)
    report = _call(apply_recipes, storage=storage, search_id=search_id, out_dir=output, recipe=recipe,
                   mlpackage=mlpackage, recipe_file=recipe_file, model=model, coreml_node=coreml_node,
                   ray_address=ray_address)
    _report(report)


@guarded
def validate_cmd(
    search_id: str = typer.Argument(..., help="search id (or a unique prefix)"),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="recipe key, or 'all' [default: all applied]"),
    package_dir: Optional[Path] = typer.Option(None, "--dir", help="folder holding the .mlpackage files, when "
                                               "they moved (e.g. copied to a Mac) [default: where apply wrote them]"),
    model: Optional[str] = ModelOption,
    coreml_node: Optional[str] = NodeOption,
    ray_address: Optional[str] = RayOption,
    db: Optional[Path] = DbOption,
) -> None:
    """Validate the applied recipes again (structure, numerics, and Core ML prediction on a Mac)."""
    from search.driver.coreml_jobs import validate_recipes

    storage = open_storage(db)
    report = _call(validate_recipes, storage=storage, search_id=search_id, recipe=recipe, package_dir=package_dir,
                   model=model, coreml_node=coreml_node, ray_address=ray_address)
    _report(report)


app.command("apply")(apply_cmd)
app.command("validate")(validate_cmd)
