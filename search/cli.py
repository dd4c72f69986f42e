"""`search`: the command line. Parses and validates input, then hands off to search.jobs."""
from __future__ import annotations

import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import typer
from platformdirs import user_data_dir
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Mixed-bit palettization recipe search for diffusion UNets (Ray + SQLite + Core ML).")
out = Console()
err = Console(stderr=True)

DB_ENV = "MBP_SEARCH_DB"


def default_db() -> Path:
    return Path(user_data_dir("mbp-search")) / "searches.db"


DbOption = typer.Option(None, "--db", envvar=DB_ENV, help=f"SQLite database [env {DB_ENV}; default: user data dir]")


class CliError(Exception):
    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _known_errors():
    from search.apple_json import RecipeFileError
    from search.config import ConfigError
    from search.jobs import DuplicateSearch
    from storage import StorageError
    from workers.models import ModelError
    from workers.palettize import PaletteError

    return (ConfigError, ModelError, StorageError, RecipeFileError, PaletteError, DuplicateSearch, CliError)


def guarded(fn):
    """Turn expected errors into one red line and a non-zero exit, never a traceback."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except _known_errors() as exc:
            fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, getattr(exc, "code", 2))
        except KeyboardInterrupt:
            fail("interrupted", 130)

    return wrapper


def open_storage(db: Optional[Path]):
    from storage import Storage

    return Storage(db or default_db())


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


# -- submit / resume ---------------------------------------------------------------------
def _run(storage, prepared, workers: Optional[int], ray_address: Optional[str]) -> None:
    from search.driver import SearchFailed, SearchInterrupted
    from search.jobs import run_search
    from search.progress import RichReporter

    sid = prepared.search.id
    try:
        with RichReporter(err) as reporter:
            search, driver = run_search(storage, prepared, workers=workers, reporter=reporter, ray_address=ray_address)
    except SearchInterrupted:
        err.print(f"[yellow]interrupted:[/] every result received is stored. Resume with:\n  search resume {sid}"
                  + (f" --db {storage.path}" if os.environ.get(DB_ENV) is None else ""))
        raise typer.Exit(130)
    except SearchFailed as exc:
        fail(f"search {sid} failed: {exc}. Fix the cause, then: search resume {sid}", 1)
    finally:
        _shutdown_ray()
    first = f"; first new result after {driver.first_result_s:.1f} s" if driver.first_result_s is not None else ""
    err.print(f"[green]search {sid} completed[/]: {driver.evaluations} evaluations this run "
              f"(+{driver.reference_runs} reference runs){first}; {search.evaluations} stored in total, "
              f"{search.elapsed_s:.1f} s of driver time", highlight=False)
    recipe_table(storage, search)
    out.print(f"download: search download {sid} -o recipes.json    plot: search plot {sid} -o psnr.png",
              highlight=False)


def _shutdown_ray() -> None:
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except Exception:
        pass


@app.command()
@guarded
def submit(
    model: str = typer.Option(..., "--model", "-m", help="Hub id, alias (sdxl-base-1.0, sd-1.5, sd-2.1-base), "
                              "local pipeline directory, or built-in tiny-sdxl / tiny-sd"),
    db: Optional[Path] = DbOption,
    workers: Optional[int] = typer.Option(None, "--workers", "-w", help="evaluator actors [default: GPUs, else 2]"),
    nbits: str = typer.Option("1,2,4,6,8", "--nbits", help="bit depths to analyse, from 1,2,4,6,8"),
    num_recipes: int = typer.Option(7, "--num-recipes", help="PSNR thresholds, one recipe each"),
    min_size: Optional[int] = typer.Option(None, "--min-size", help="candidate weights have more elements than this "
                                           "[default: 100000; tiny models: smaller]"),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="calibration prompts file, one per line"),
    seed: int = typer.Option(0, "--seed"),
    steps: int = typer.Option(1, "--steps", help="denoising steps per pipeline run"),
    resolution: Optional[int] = typer.Option(None, "--resolution", help="image size in pixels [model default]"),
    batch_size: int = typer.Option(0, "--batch-size", help="prompts per pipeline call [0: all]"),
    precision: str = typer.Option("auto", "--precision", help="auto (fp16 on GPU, fp32 on CPU), float16, float32"),
    strategy: str = typer.Option("apple", "--strategy", help="apple (Apple's thresholds), optimal (knapsack on "
                                 "predicted PSNR), or both"),
    targets: Optional[str] = typer.Option(None, "--targets", help="average bits of the optimal recipes, e.g. 3,4,5,6"),
    evals: str = typer.Option("full", "--evals", help="full, or fast: isolated impact at the anchor bit depths only "
                              "(optimal strategy)"),
    anchors: Optional[str] = typer.Option(None, "--anchors", help="anchor bit depths measured by --evals fast "
                                          "[default: the searched depth nearest 4]"),
    curves: Optional[bool] = typer.Option(None, "--curves/--no-curves", help="cumulative curves [default: only for "
                                          "the apple strategy]"),
    resume: bool = typer.Option(False, "--resume", help="if an unfinished search has this model and config, resume it"),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", envvar="RAY_ADDRESS",
                                              help="join a running Ray cluster instead of starting a local one"),
) -> None:
    """Run the mixed-bit analysis of MODEL's UNet and build recipes."""
    from search.config import SearchConfig, parse_floats, parse_nbits, parse_prompts_file, parse_strategy
    from search.jobs import DuplicateSearch, prepare_search, resolve_config
    from storage.engine import check_database_file
    from workers.models import resolve_model

    if workers is not None and workers < 1:
        raise CliError(f"--workers must be at least 1, got {workers}")
    options = dict(nbits=parse_nbits(nbits), num_recipes=num_recipes, min_size=min_size, seed=seed, steps=steps,
                   resolution=resolution, batch_size=batch_size, precision=precision,
                   strategy=parse_strategy(strategy), targets=parse_floats(targets, "--targets") if targets else (),
                   evals=evals, anchors=parse_nbits(anchors, "--anchors") if anchors else None,
                   curves=curves)
    if prompts is not None:
        options["prompts"] = parse_prompts_file(str(prompts))
    SearchConfig(**{k: v for k, v in options.items() if v is not None})  # fail fast, before loading a model
    check_database_file(db or default_db())  # read-only: refuse a foreign file before any work
    spec = resolve_model(model)
    config = resolve_config(spec, **options)
    storage = open_storage(db)
    try:
        prepared = prepare_search(storage, model, config, spec, resume_duplicate=resume)
    except DuplicateSearch as exc:
        raise CliError(f"{exc}; resume it with `search resume {exc.existing.id}` or add --resume", 1) from None
    out.print(f"search {prepared.search.id}", highlight=False)
    if not prepared.created:
        err.print(f"resuming unfinished search {prepared.search.id}")
    _run(storage, prepared, workers, ray_address)


@app.command()
@guarded
def resume(
    search_id: str = typer.Argument(..., help="search id (or a unique prefix)"),
    db: Optional[Path] = DbOption,
    workers: Optional[int] = typer.Option(None, "--workers", "-w"),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", envvar="RAY_ADDRESS"),
) -> None:
    """Continue an interrupted or failed search; stored measurements are never recomputed."""
    from search.jobs import prepare_resume

    storage = open_storage(db)
    prepared = prepare_resume(storage, search_id)
    out.print(f"search {prepared.search.id}", highlight=False)
    counts = storage.count_measurements(prepared.search.id)
    err.print(f"resuming: {sum(counts.values())} measurements already stored {dict(sorted(counts.items()))}")
    _run(storage, prepared, workers, ray_address)


@app.command()
@guarded
def recipe(
    search_id: str = typer.Argument(..., help="search id (or a unique prefix)"),
    bits: Optional[float] = typer.Option(None, "--bits", help="average bits per weight at most this"),
    size_mb: Optional[float] = typer.Option(None, "--size-mb", help="candidate weights at most this many MB"),
    psnr: Optional[float] = typer.Option(None, "--psnr", help="smallest recipe predicted to keep this PSNR (dB)"),
    db: Optional[Path] = DbOption,
    workers: int = typer.Option(1, "--workers", "-w"),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", envvar="RAY_ADDRESS"),
) -> None:
    """Build the optimal recipe for a size or PSNR target from stored measurements and measure it."""
    from search.jobs import target_recipe
    from search.progress import RichReporter

    if sum(v is not None for v in (bits, size_mb, psnr)) != 1:
        raise CliError("give exactly one of --bits, --size-mb, --psnr")
    storage = open_storage(db)
    try:
        with RichReporter(err) as reporter:
            r, _ = target_recipe(storage, search_id, bits=bits, size_mb=size_mb, psnr=psnr, workers=workers,
                                 reporter=reporter, ray_address=ray_address)
    finally:
        _shutdown_ray()
    table = Table(title=f"optimal recipe for {r.target}")
    for col in ("key", "avg bits", "size MB", "predicted PSNR dB", "measured PSNR dB", "|error| dB"):
        table.add_column(col, justify="left" if col == "key" else "right")
    err_db = abs(r.predicted_psnr - r.psnr) if r.predicted_psnr is not None and r.psnr is not None else None
    table.add_row(r.key, f"{r.avg_bits:.2f}", f"{r.size_mb:.2f}", _fmt(r.predicted_psnr), _fmt(r.psnr), _fmt(err_db))
    out.print(table)


def _fmt(value: Optional[float]) -> str:
    return f"{value:.2f}" if value is not None else "-"


@app.command()
@guarded
def cancel(search_id: str, db: Optional[Path] = DbOption) -> None:
    """Stop a running search; its driver stores what it has and marks it cancelled (resumable)."""
    storage = open_storage(db)
    s = storage.get_search(search_id)
    if not storage.request_cancel(s.id):
        raise CliError(f"search {s.id} is not running (status {s.effective_status(_now())})")
    err.print(f"cancel requested for search {s.id}; its driver stops within a few seconds")


# -- inspection --------------------------------------------------------------------------
def _summary(storage, s) -> dict:
    counts = storage.count_measurements(s.id)
    return {"id": s.id, "model": s.model, "model_version": s.model_version, "status": s.effective_status(_now()),
            "phase": s.phase, "created_at": s.created_at.isoformat() + "Z", "evaluations": s.evaluations,
            "measurements": counts, "error": s.error}


@app.command("list")
@guarded
def list_(db: Optional[Path] = DbOption, as_json: bool = typer.Option(False, "--json")) -> None:
    """List the searches in the database."""
    storage = open_storage(db)
    rows = [_summary(storage, s) for s in storage.list_searches()]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title=f"searches in {storage.path}")
    for col in ("id", "model", "status", "phase", "evaluations", "created (UTC)"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["id"], r["model"], r["status"], r["phase"], str(r["evaluations"]), r["created_at"][:19])
    out.print(table)


def recipe_table(storage, search) -> None:
    recipes = storage.recipes(search.id)
    baselines = storage.baselines(search.id)
    table = Table(title=f"recipes of search {search.id} ({search.model})")
    table.add_column("key", no_wrap=True)
    for col in ("strategy", "avg bits", "size MB", "threshold dB", "predicted dB", "measured PSNR dB"):
        table.add_column(col, justify="left" if col == "strategy" else "right")
    for name in ("original", "linear_8bit"):
        if name in baselines:
            table.add_row(f"[dim]{name}", "", "16.00" if name == "original" else "8.00", "", "", "",
                          f"{baselines[name].psnr:.2f}")
    for r in sorted(recipes, key=lambda r: -r.avg_bits):
        table.add_row(r.key, r.strategy, f"{r.avg_bits:.2f}", f"{r.size_mb:.2f}", _fmt(r.threshold),
                      _fmt(r.predicted_psnr), f"{r.psnr:.2f}" if r.psnr is not None else "pending")
    out.print(table)


@app.command()
@guarded
def status(search_id: str, db: Optional[Path] = DbOption, as_json: bool = typer.Option(False, "--json")) -> None:
    """Show a search: status, phase, measurement counts, recipes."""
    storage = open_storage(db)
    s = storage.get_search(search_id)
    info = _summary(storage, s)
    info.update(config=s.config, fingerprint=s.fingerprint, elapsed_s=s.elapsed_s, candidates=len(storage.layers(s.id)),
                baselines={k: b.psnr for k, b in storage.baselines(s.id).items()},
                recipes=[{"key": r.key, "avg_bits": r.avg_bits, "size_mb": r.size_mb, "threshold": r.threshold,
                          "psnr": r.psnr, "strategy": r.strategy} for r in storage.recipes(s.id)])
    if as_json:
        print(json.dumps(info, indent=2, default=str))
        return
    n, nb = info["candidates"], len(s.config["nbits"])
    out.print(f"search [bold]{s.id}[/]  model {s.model}  status [bold]{info['status']}[/]  phase {s.phase}",
              highlight=False)
    out.print(f"candidates {n} × bit depths {s.config['nbits']}: isolated {info['measurements'].get('isolated', 0)}/{n * nb}"
              f", cumulative {info['measurements'].get('cumulative', 0)}/{n * nb}; pipeline runs stored {s.evaluations}; "
              f"driver time {s.elapsed_s:.1f} s", highlight=False)
    if s.error:
        out.print(f"[red]error:[/] {s.error}", highlight=False)
    recipe_table(storage, s)


@app.command()
@guarded
def download(search_id: str, output: str = typer.Option(..., "-o", "--output", help="JSON file, or - for stdout"),
             db: Optional[Path] = DbOption) -> None:
    """Write the search's recipes and measurements in Apple's JSON format."""
    from search.apple_json import to_apple_json
    from search.results import build_report

    storage = open_storage(db)
    s = storage.get_search(search_id)
    text = json.dumps(to_apple_json(build_report(storage, s)), indent=2, allow_nan=False)
    if output == "-":
        sys.stdout.write(text + "\n")
        return
    _write_text(Path(output), text + "\n")
    err.print(f"wrote {output} ({len(storage.recipes(s.id))} recipes, status {s.effective_status(_now())})")


def _write_text(path: Path, text: str) -> None:
    if path.is_dir():
        raise CliError(f"{path} is a directory; give a file name")
    if not path.parent.exists():
        raise CliError(f"directory {path.parent} does not exist")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@app.command()
@guarded
def plot(search_id: str, output: Path = typer.Option(..., "-o", "--output", help="PNG file"),
         db: Optional[Path] = DbOption) -> None:
    """PSNR vs model-size reduction: cumulative curves per bit depth, linear 8-bit, recipes."""
    from search.plot import plot_report
    from search.results import build_report

    if output.suffix.lower() != ".png":
        raise CliError(f"plot output must be a .png file, got {output}")
    if not output.parent.exists():
        raise CliError(f"directory {output.parent} does not exist")
    storage = open_storage(db)
    s = storage.get_search(search_id)
    plot_report(build_report(storage, s), output)
    err.print(f"wrote {output}")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
