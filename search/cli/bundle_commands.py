"""`search bundle`: one recipe as the Resources folder Apple's Swift pipeline loads.

The options are declared here once and parsed into the frozen ``BundleOptions`` the Core ML worker
builds with (``workers.coreml.bundle.contract``); the work is ``search.driver.bundle_jobs``.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from search.cli.console import CliError, err, guarded, out
from search.cli.coreml_commands import NodeOption, call_driver
from search.cli.options import DbOption, RayOption, SearchIdArgument
from workers.coreml.bundle.contract import ATTENTIONS, ENCODER_NBITS, BundleOptions

_SIZE = re.compile(r"(\d+)(?:x(\d+))?")


def parse_latent_size(text: str | None) -> tuple[int, int] | None:
    """``64`` or ``64x96`` (latent pixels, H x W) -> (H, W); one-line error otherwise."""
    if text is None:
        return None
    m = _SIZE.fullmatch(text.strip().lower())
    if m is None:
        raise CliError(f"--latent-size must be H or HxW in latent pixels (e.g. 64 or 64x96), got '{text}'")
    h = int(m.group(1))
    return h, int(m.group(2) or h)


def bundle_options(attention: str, chunk: bool, batch_one: bool, latent_size: str | None,
                   encoders_nbits: int | None, compile_: bool) -> BundleOptions:
    try:
        return BundleOptions(attention, chunk, batch_one, parse_latent_size(latent_size), encoders_nbits, compile_)
    except ValueError as exc:
        raise CliError(str(exc)) from None


@guarded
def bundle_cmd(
    search_id: str = SearchIdArgument,
    recipe: Optional[str] = typer.Option(None, "--recipe", help="recipe key (one recipe per bundle)"),
    output: Path = typer.Option(..., "-o", "--output", help="the Resources folder to create (new or empty)"),
    attention: str = typer.Option("split-einsum", "--attention",
                                  help=f"attention implementation: {', '.join(ATTENTIONS)} (split-einsum: "
                                       "Apple's default, for the Neural Engine; original: for the GPU)"),
    chunk: bool = typer.Option(False, "--chunk", help="the denoiser in two chunks of about equal size "
                               "(UnetChunk1/UnetChunk2), as iOS needs"),
    batch_one: bool = typer.Option(False, "--batch-one", help="denoiser batch 1 instead of 2 (guidance-free "
                                   "few-step models)"),
    latent_size: Optional[str] = typer.Option(None, "--latent-size", help="latent H or HxW for the denoiser and "
                                              "the VAE [default: the denoiser's sample_size]"),
    encoders_nbits: Optional[int] = typer.Option(None, "--encoders-nbits", help="palettize the text encoders and "
                                                 f"the VAE uniformly at {'/'.join(map(str, ENCODER_NBITS))} bits "
                                                 "[default: float16]"),
    compile_: bool = typer.Option(False, "--compile", help="compile every model to .mlmodelc (macOS only)"),
    coreml_node: Optional[str] = NodeOption,
    ray_address: Optional[str] = RayOption,
    db: Optional[Path] = DbOption,
) -> None:
    """Build the folder Apple's Swift StableDiffusionPipeline / StableDiffusionXLPipeline loads
    (`resourcesAt:`): the recipe's denoiser with the search's exact LUTs on Apple's contract,
    text encoders, VAE, vocab.json, merges.txt, and bundle.json."""
    options = bundle_options(attention, chunk, batch_one, latent_size, encoders_nbits, compile_)
    from search.cli.local_backend import LocalBackend
    from search.driver.bundle_jobs import bundle_recipe

    with LocalBackend(db) as backend:
        report = call_driver(bundle_recipe, storage=backend.storage, search_id=search_id, recipe=recipe, out_dir=output,
                       options=options, coreml_node=coreml_node, ray_address=ray_address)
    r = report.result
    for f in r.files:
        if f.path.count("/") == 0 or f.path.endswith("weight.bin"):
            out.print(escape(f"  {f.path}  {f.bytes / 1e6:.2f} MB"), highlight=False, soft_wrap=True)
    out.print(escape(f"{r.path}: {r.family} bundle of recipe {report.info.recipe_key}, {r.total_bytes / 1e6:.2f} MB, "
                     f"{r.deployment_target}, attention {options.attention}"
                     f"{', chunked' if options.chunk else ''}"), highlight=False, soft_wrap=True)
    out.print(escape(report.info.detail), highlight=False, soft_wrap=True)
    if not r.compiled:
        err.print("off macOS the folder holds .mlpackage files: compile them on a Mac (README.txt in the folder) "
                  "before Swift's resourcesAt: loads them", highlight=False)
    if report.info.status == "failed":
        err.print(f"[bold red]validation failed:[/] {escape(report.info.detail)}", highlight=False)
        raise typer.Exit(1)
