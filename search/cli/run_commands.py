"""`search submit`, `resume`, `recipe` and `cancel`: the commands that start or stop work. One code
path each over a backend (search.cli.backend): the local database, or the service with --server."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional

import typer

from search.cli import views
from search.cli.backend import Backend, open_backend
from search.cli.console import CliError, err, guarded, out
from search.driver.signals import stop_on_signals
from search.cli.options import (DbOption, RayOption, SearchIdArgument, ServerOption, TokenOption, WaitOption,
                                search_flags)
from search.submit_options import (APPLY_HELP, COREML_NODE_HELP, REFINE_EVALS, REFINE_EVALS_HELP, RESUME_HELP,
                                   WORKERS_HELP, check_coreai_installed, parse_apply, parse_search_options)

MODEL_HELP = ("Hub id, alias (sdxl-base-1.0, sdxl-refiner-1.0, sd-1.5, sd-2.1-base, sdxl-turbo, sd-turbo, "
              "lcm-dreamshaper-v7, sd3.5-medium, sd3.5-large, flux-schnell, flux-dev, pixart-sigma, ...), local "
              "pipeline directory, or built-in tiny-sdxl / tiny-sd / tiny-sdxl-refiner / tiny-sd3 / tiny-flux / "
              "tiny-pixart (tests, demos) or sdxl-arch / sd15-arch / sd35m-arch (benchmarks: the real SDXL / SD1.5 "
              "UNet / SD3.5-medium transformer architectures with random weights, built locally once: ~5 / ~2 / "
              "~6 GB)")
WorkersOption = typer.Option(None, "--workers", "-w", help=WORKERS_HELP)


def _check_workers(workers: Optional[int]) -> None:
    if workers is not None and workers < 1:
        raise CliError(f"--workers must be at least 1, got {workers}")


def _interruptible(fn):
    """Ctrl-C / SIGTERM anywhere in the command: the search stops within seconds, is stored as
    interrupted, and the command exits with 130; a second one exits at once (search.driver.signals)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with stop_on_signals():
            return fn(*args, **kwargs)

    return wrapper


def _run_to_end(backend: Backend, sid: str, workers: Optional[int], ray_address: Optional[str]) -> None:
    """Run the search here (local) or follow it on the service, then say how it ended."""
    info, ended = backend.run(sid, workers=workers, ray_address=ray_address)
    views.run_ended(info, ended, backend.where, backend.resume_where)


@search_flags(after="workers")
@guarded
@_interruptible
def submit(
    ctx: typer.Context,
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
    db: Optional[Path] = DbOption,
    workers: Optional[int] = WorkersOption,
    resume: bool = typer.Option(False, "--resume", help=RESUME_HELP),
    ray_address: Optional[str] = RayOption,
    server: Optional[str] = ServerOption,
    token: Optional[str] = TokenOption,
    wait: bool = WaitOption,
    apply: Optional[str] = typer.Option(None, "--apply", help=APPLY_HELP),
    coreml_node: Optional[str] = typer.Option(None, "--coreml-node", help=COREML_NODE_HELP),
    **flags,
) -> None:
    """Run the mixed-bit analysis of MODEL's UNet and build recipes (with --server: on the service);
    with --apply, then apply them on the Core ML node and ship the packages back."""
    from search.config import parse_prompts_file

    _check_workers(workers)
    request = {"model": model, "workers": workers, **flags, "resume": resume}
    if flags["prompts"] is not None:
        request["prompts"] = list(parse_prompts_file(str(flags["prompts"])))
    parse_search_options(request)  # fail fast, before loading a model or asking the service
    if not server:  # the service checks its own packages
        check_coreai_installed(flags["target"])
    if apply is not None:
        if coreml_node is None and not server:  # as `search apply`: any node when Ray runs embedded on Linux
            from search.driver.coreml_jobs import default_coreml_node

            coreml_node = default_coreml_node(ray_address)
        request.update(zip(("apply", "coreml_node"), parse_apply(apply, coreml_node, flags["target"])))
    elif coreml_node is not None:
        raise CliError("--coreml-node goes with --apply")
    with open_backend(ctx, db, server, token, local=("db", "ray_address")) as backend:
        if wait and backend.runs_here:
            raise CliError("--wait is for --server (a local search always runs in the foreground)")
        info = backend.submit(request)
        sid = info["id"]
        try:
            out.print(f"search {sid}", highlight=False)
            if not info.get("created", True):
                err.print(f"resuming unfinished search {sid}")
            if backend.runs_here or wait:
                return _run_to_end(backend, sid, workers, ray_address)
        except KeyboardInterrupt:  # stored, not yet running: resumable as any interrupted search
            views.run_ended(info, {"status": "interrupted"}, backend.where, backend.resume_where)
        err.print(f"submitted to {backend.server}; watch it with `search status {sid}{backend.where}`",
                  highlight=False)


@guarded
@_interruptible
def resume(
    ctx: typer.Context,
    search_id: str = SearchIdArgument,
    db: Optional[Path] = DbOption,
    workers: Optional[int] = WorkersOption,
    ray_address: Optional[str] = RayOption,
    server: Optional[str] = ServerOption,
    token: Optional[str] = TokenOption,
    wait: bool = WaitOption,
) -> None:
    """Continue an interrupted or failed search; stored measurements are never recomputed."""
    _check_workers(workers)
    with open_backend(ctx, db, server, token, local=("db", "ray_address")) as backend:
        if wait and backend.runs_here:
            raise CliError("--wait is for --server (a local search always runs in the foreground)")
        info = backend.resume(search_id, workers)
        out.print(f"search {info['id']}", highlight=False)
        counts = info.get("measurements", {})
        err.print(f"resuming: {sum(counts.values())} measurements already stored ({views.counts_text(counts)})",
                  highlight=False)
        if backend.runs_here or wait:
            _run_to_end(backend, info["id"], workers, ray_address)


@guarded
@_interruptible
def recipe(
    ctx: typer.Context,
    search_id: str = SearchIdArgument,
    bits: Optional[float] = typer.Option(None, "--bits", help="average bits per weight at most this"),
    size_mb: Optional[float] = typer.Option(None, "--size-mb", help="candidate weights at most this many MB"),
    psnr: Optional[float] = typer.Option(None, "--psnr", help="smallest recipe predicted to keep this PSNR (dB)"),
    db: Optional[Path] = DbOption,
    workers: int = typer.Option(1, "--workers", "-w", help="evaluator actors"),
    ray_address: Optional[str] = RayOption,
    refine_evals: int = typer.Option(REFINE_EVALS, "--refine-evals", help=REFINE_EVALS_HELP),
    server: Optional[str] = ServerOption,
    token: Optional[str] = TokenOption,
) -> None:
    """Build the optimal recipe for a size or PSNR target from stored measurements and measure it;
    for --bits / --size-mb, refine it with end-to-end measurements (--refine-evals 0: one-shot).
    With --server, on the service."""
    if sum(v is not None for v in (bits, size_mb, psnr)) != 1:
        raise CliError("give exactly one of --bits, --size-mb, --psnr")
    _check_workers(workers)
    if refine_evals < 0:
        raise CliError(f"--refine-evals must be 0 (one-shot) or more, got {refine_evals}")
    with open_backend(ctx, db, server, token, local=("db", "ray_address")) as backend:
        r = backend.target_recipe(search_id, bits=bits, size_mb=size_mb, psnr=psnr, workers=workers,
                                  ray_address=ray_address, refine_evals=refine_evals)
    views.print_uncut(views.target_recipe_table(r))


@guarded
def cancel(ctx: typer.Context, search_id: str = SearchIdArgument, db: Optional[Path] = DbOption,
           server: Optional[str] = ServerOption, token: Optional[str] = TokenOption) -> None:
    """Stop a running search; its driver stores what it has and marks it cancelled (resumable)."""
    with open_backend(ctx, db, server, token) as backend:
        info = backend.cancel(search_id)
    err.print(f"cancel requested for search {info['id']}; its driver stops within a few seconds")
