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

from search.cli.console import CliError, call_driver, err, guarded, out
from search.cli.options import DbOption, NodeOption, RayOption, SearchIdArgument
from workers.coreml.bundle.contract import ATTENTIONS, ENCODER_NBITS, BundleOptions

TARGETS = ("coreml", "coreai")
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
    target: str = typer.Option("coreml", "--target", help="coreml: the Resources folder of Apple's Core ML Swift "
                               "pipeline; coreai: the folder Apple's Core AI exporter writes (.aimodel assets, "
                               "needs the [coreai] extra)"),
    compare_4bit: bool = typer.Option(True, "--compare-4bit/--no-compare-4bit", help="coreai: also measure "
                                      "Apple's 4bit preset on the same model and protocol (the table)"),
    as_json: bool = typer.Option(False, "--json", help="coreai: print the checks and the table as JSON"),
    coreml_node: Optional[str] = NodeOption,
    ray_address: Optional[str] = RayOption,
    db: Optional[Path] = DbOption,
) -> None:
    """Build the folder Apple's Swift StableDiffusionPipeline / StableDiffusionXLPipeline loads
    (`resourcesAt:`): the recipe's denoiser with the search's exact LUTs on Apple's contract,
    text encoders, VAE, vocab.json, merges.txt, and bundle.json. With --target coreai: the folder
    Apple's Core AI diffusion exporter writes (docs/coreai.md), checked on the Core AI runtime."""
    if target not in TARGETS:
        raise CliError(f"--target must be one of {', '.join(TARGETS)}, got '{target}'")
    if target == "coreai":
        given = [flag for flag, on in (("--attention", attention != "split-einsum"), ("--chunk", chunk),
                                       ("--batch-one", batch_one), ("--latent-size", latent_size is not None),
                                       ("--encoders-nbits", encoders_nbits is not None), ("--compile", compile_),
                                       ("--coreml-node", coreml_node is not None)) if on]
        if given:
            raise CliError(f"{', '.join(given)} apply to --target coreml only (the Core AI folder is Apple's "
                           "exporter layout, built and checked in this process)")
        return bundle_coreai_cmd(search_id, recipe, output, compare_4bit, as_json, db)
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


def comparison_lines(comparison: dict) -> list[str]:
    """The recipe vs Apple's 4bit preset, one row each: what the CLI prints (JSON has the same numbers)."""
    rows = comparison["rows"]
    lines = [f"{'':34} {'bits/weight':>11} {'size MB':>8} {'PSNR dB':>8}"]
    for r in rows:
        lines.append(f"{r['name'][:34]:34} {r['bits_per_weight']:11.3f} {r['asset_bytes'] / 1e6:8.3f} {r['psnr']:8.2f}")
    q = rows[1].get("quantized_weights") or 0
    lines.append(f"recipe - 4bit: {comparison['delta_db']:+.2f} dB; bits/weight = stored bits (LUTs and scales "
                 f"included) / the denoiser's {comparison['weights']:,} weights; the 4bit preset quantizes "
                 f"{q:,} of them at 4.5 bits")
    return lines


def bundle_coreai_cmd(search_id: str, recipe: str | None, output: Path, compare_4bit: bool, as_json: bool,
                      db: Path | None) -> None:
    """`search bundle --target coreai`: build in this process, print the checks and the table."""
    import json
    from dataclasses import asdict

    from search.cli.local_backend import LocalBackend
    from search.driver.bundle_jobs import bundle_coreai

    with LocalBackend(db) as backend:
        report = call_driver(bundle_coreai, storage=backend.storage, search_id=search_id, recipe=recipe,
                             out_dir=output, compare_4bit=compare_4bit)
    r = report.result
    ok = r.luts_ok and r.runtime_ok is not False
    if as_json:
        out.print_json(json.dumps({"search_id": report.search_id, "recipe": report.recipe_key, "ok": ok,
                                   **asdict(r)}, default=str))
    else:
        for name in sorted(r.assets.values()):
            size = sum(b for f, b in r.files.items() if f.startswith(name + "/"))
            out.print(escape(f"  {name}  {size / 1e6:.2f} MB"), highlight=False)
        out.print(escape(f"{r.path}: Core AI {r.pipeline} bundle of recipe {report.recipe_key}, "
                         f"{r.total_bytes / 1e6:.2f} MB"), highlight=False, soft_wrap=True)
        out.print(escape(f"LUTs: {r.luts_detail}"), highlight=False, soft_wrap=True)
        out.print(escape(f"runtime: {r.runtime_detail}"), highlight=False, soft_wrap=True)
        if r.comparison:
            for line in comparison_lines(r.comparison):
                out.print(escape(line), highlight=False, soft_wrap=True)
        err.print("speed and memory need a Mac (macOS 27 / iOS 27); this Linux check is the numbers only",
                  highlight=False)
    if not ok:
        err.print("[bold red]validation failed[/]", highlight=False)
        raise typer.Exit(1)
