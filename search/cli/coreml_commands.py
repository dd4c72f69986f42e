"""`search apply` and `search validate`: the Core ML stage on the command line. Local, or with
--server queued on the cluster's Core ML node (search.service.coreml_routes), or with --server
--here run on this machine for a search on the service (search.cli.apply_here).

search.cli.app registers them; the validation table itself is one of search.cli.views.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from common.errors import first_line
from search.cli.console import CliError, call_driver, err, guarded, out
from search.cli.options import (DbOption, NodeOption, RayOption, SearchIdArgument, ServerOption, TokenOption,
                                local_only)
from search.cli.views import print_uncut, search_validations, validation_table as _validation_table

MODEL_HELP = ("torch model whose weights the .mlpackage holds, when it is not the search's model (e.g. a "
              "fine-tuned variant): layer names and LUTs then come from it [default: the search's model]")
RecipeOption = typer.Option(None, "--recipe", help="recipe key, or 'all'")
ModelOption = typer.Option(None, "--model", help=MODEL_HELP)
TARGET_HELP = ("coreai: the folders Apple's Core AI exporter writes instead of Core ML packages (with --server: all "
               "recipes unless --recipe, 3-bit ones refused in one line each, --coreml-node any by default; locally: "
               "`search bundle --target coreai`, one recipe) [default: the search's own target]")


def _coreai_flags(ctx: typer.Context, here: bool) -> None:
    """Refuse, in one line, what applies to Core ML packages only."""
    given = [f for f, on in (("--here", here), ("--mlpackage", ctx.params.get("mlpackage") is not None),
                             ("--recipe-file", ctx.params.get("recipe_file") is not None),
                             ("--model", ctx.params.get("model") is not None)) if on]
    if given:
        raise CliError(f"{', '.join(given)} apply to Core ML packages only, not --target coreai")


def validation_table(storage, search):
    """The stored validations of ``search``, as `search status` shows them; None when nothing was applied."""
    from search.read_models import search_detail

    return search_validations(search_detail(storage, search))


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
    print_uncut(_validation_table(f"Core ML recipes of search {report.search_id}",
                                  [(asdict(v), measured.get(v.recipe_key)) for v in report.validations]))
    notes = {v.runtime_note for v in report.validations if not v.runtime}
    for note in sorted(notes):
        out.print(escape(f"runtime validation {note}"), highlight=False, soft_wrap=True)
    if report.failed:
        err.print(f"[bold red]validation failed:[/] {escape(', '.join(report.failed))}", highlight=False)
        raise typer.Exit(1)


def _queue_on_service(ctx: typer.Context, search_id: str, recipe: Optional[str], coreml_node: Optional[str],
                      server: str, token: Optional[str], target: Optional[str] = None,
                      compare_4bit: bool = True) -> None:
    """`search apply ID --server URL`: queue the Core ML phase on the cluster and return at once
    (``target`` coreai: Core AI folders instead; the service picks the node, any by default)."""
    from search.cli.backend import open_backend
    from search.submit_options import parse_apply

    local_only(ctx, "output", "mlpackage", "recipe_file", "model", "ray_address", "db")
    apply, node = parse_apply(recipe or "all", coreml_node, target or "coreml")
    with open_backend(ctx, None, server, token) as backend:
        if target is None:
            info = backend.queue_coreml(search_id, apply, node)
        else:
            from search.service.client import _segment

            body = {"apply": apply, "target": target, "coreml_node": coreml_node,
                    "compare_4bit": None if compare_4bit else False}
            info = backend.client.request("POST", f"/searches/{_segment(search_id)}/coreml",
                                          json={k: v for k, v in body.items() if v is not None}).json()
    cm = info["coreml"]
    if cm.get("target") == "coreai":
        out.print(f"search {info['id']}: Core AI phase {info['note']} ({cm['recipes']} recipe(s))", highlight=False)
        err.print(f"watch it with `search status {info['id']} --server {backend.server}`; fetch the folders with "
                  f"`search download {info['id']} --bundle all -o DIR --server {backend.server}`", highlight=False)
        return
    out.print(f"search {info['id']}: Core ML phase {info['note']} ({cm['recipes']} recipe(s), "
              f"{cm['applied']} already shipped)", highlight=False)
    err.print(f"watch it with `search status {info['id']} --server {backend.server}`; fetch the packages with "
              f"`search download {info['id']} --mlpackage all -o DIR --server {backend.server}` (their Resources "
              "folders for Apple's Swift pipeline: --bundle all)", highlight=False)


def _apply_here(ctx: typer.Context, search_id: str, recipe: Optional[str], output: Optional[Path],
                mlpackage: Optional[Path], server: Optional[str], token: Optional[str]) -> None:
    """`search apply ID --server URL --here -o DIR` (search.cli.apply_here)."""
    from search.cli.apply_here import apply_here
    from search.driver.coreml_jobs import ApplyError, ApplyReport
    from search.service.client import Client
    from storage import Validation
    from workers.coreml.common import CoreMLError

    if not server or output is None:
        raise CliError("--here needs --server URL (the search's service) and -o DIR (for the .mlpackage files)")
    local_only(ctx, "recipe_file", "model", "coreml_node", "ray_address", "db")
    with Client(server, token) as client:
        try:
            result, view, rows = apply_here(client, search_id, recipe, output, mlpackage)
        except (ApplyError, CoreMLError) as exc:
            raise CliError(first_line(exc)) from None
    err.print(f"validations posted to {server}: `search status {view['id']} --server {server}` shows them",
              highlight=False)
    _report(ApplyReport(view["id"], rows[0]["node"] if rows else "", result.base_mlpackage, result.base_cached,
                        result.outcomes, tuple(Validation(**r) for r in rows)))


@guarded
def apply_cmd(
    ctx: typer.Context,
    search_id: str = SearchIdArgument,
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="directory for the .mlpackage files "
                                          "(local; required without --server)"),
    recipe: Optional[str] = RecipeOption,
    mlpackage: Optional[Path] = typer.Option(None, "--mlpackage", help="the float16 UNet .mlpackage to compress "
                                             "(e.g. from Apple's torch2coreml) [default: convert the search's UNet]"),
    recipe_file: Optional[Path] = typer.Option(None, "--recipe-file", help="recipes in Apple's JSON format "
                                               "instead of the search's (LUTs from k-means on the model's weights)"),
    model: Optional[str] = ModelOption,
    coreml_node: Optional[str] = NodeOption,
    ray_address: Optional[str] = RayOption,
    db: Optional[Path] = DbOption,
    server: Optional[str] = ServerOption,
    token: Optional[str] = TokenOption,
    here: bool = typer.Option(False, "--here", help="with --server: apply on this machine (a Mac outside the "
                              "cluster) with the search's recipes and exact palettes fetched from the service, "
                              "and post the validations back"),
    target: Optional[str] = typer.Option(None, "--target", help=TARGET_HELP),
    compare_4bit: bool = typer.Option(True, "--compare-4bit/--no-compare-4bit", help="--target coreai: also "
                                      "measure Apple's 4bit preset on the same model and protocol (the table)"),
) -> None:
    """Palettize a Core ML UNet with a recipe's exact LUTs, one .mlpackage per recipe, and validate it.
    With --server: queue that on the cluster's Core ML node (all recipes unless --recipe) and return;
    the packages come back to the service (`search download ID --mlpackage`). With --target coreai:
    Core AI folders instead (`search download ID --bundle`)."""
    if target not in (None, "coreml", "coreai"):
        raise CliError(f"--target must be one of coreml, coreai, got '{target}'")
    if target == "coreai":
        _coreai_flags(ctx, here)
    elif not compare_4bit:
        raise CliError("--no-compare-4bit applies to --target coreai only")
    if here:
        return _apply_here(ctx, search_id, recipe, output, mlpackage, server, token)
    if server:
        return _queue_on_service(ctx, search_id, recipe, coreml_node, server, token, target, compare_4bit)
    if target == "coreai":  # locally: `search bundle ID --target coreai -o DIR`, one recipe
        from search.cli.bundle_commands import bundle_coreai_cmd

        if output is None:
            raise CliError("give -o DIR for the Core AI folder (or --server URL to build them on the cluster)")
        return bundle_coreai_cmd(search_id, recipe, output, compare_4bit, False, db)
    if output is None:
        raise CliError("give -o DIR for the .mlpackage files (or --server URL to apply on the cluster)")
    from search.cli.local_backend import LocalBackend
    from search.driver.coreml_jobs import apply_recipes

    with LocalBackend(db) as backend:
        report = call_driver(apply_recipes, storage=backend.storage, search_id=search_id, out_dir=output, recipe=recipe,
                       mlpackage=mlpackage, recipe_file=recipe_file, model=model, coreml_node=coreml_node,
                       ray_address=ray_address)
    _report(report)


@guarded
def validate_cmd(
    search_id: str = SearchIdArgument,
    recipe: Optional[str] = typer.Option(None, "--recipe", help="recipe key, or 'all' [default: all applied]"),
    package_dir: Optional[Path] = typer.Option(None, "--dir", help="folder holding the .mlpackage files, when "
                                               "they moved (e.g. copied to a Mac) [default: where apply wrote them]"),
    model: Optional[str] = ModelOption,
    coreml_node: Optional[str] = NodeOption,
    ray_address: Optional[str] = RayOption,
    db: Optional[Path] = DbOption,
) -> None:
    """Validate the applied recipes again (structure, numerics, and Core ML prediction on a Mac)."""
    from search.cli.local_backend import LocalBackend
    from search.driver.coreml_jobs import validate_recipes

    with LocalBackend(db) as backend:
        report = call_driver(validate_recipes, storage=backend.storage, search_id=search_id, recipe=recipe,
                       package_dir=package_dir, model=model, coreml_node=coreml_node, ray_address=ray_address)
    _report(report)

