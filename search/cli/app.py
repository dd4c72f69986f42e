"""`search`: the command line. Parses and validates input, then hands off to search.jobs."""
from __future__ import annotations

import json
from dataclasses import asdict
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
SERVER_ENV = "MBP_SEARCH_SERVER"
TOKEN_ENV = "MBP_SEARCH_TOKEN"


def default_db() -> Path:
    return Path(user_data_dir("mbp-search")) / "searches.db"


DbOption = typer.Option(None, "--db", envvar=DB_ENV, help=f"SQLite database [env {DB_ENV}; default: user data dir]")
ServerOption = typer.Option(None, "--server", envvar=SERVER_ENV, help=f"URL of a search service (`search serve`) to "
                            f"talk to instead of the local database [env {SERVER_ENV}]")
TokenOption = typer.Option(None, "--token", envvar=TOKEN_ENV, help=f"the service's token [env {TOKEN_ENV}]")


class CliError(Exception):
    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _known_errors():
    from search.recipes.apple_json import RecipeFileError
    from search.config import ConfigError
    from search.driver.jobs import DuplicateSearch
    from search.service.client import RemoteError
    from storage import StorageError
    from workers.models import ModelError
    from workers.palettize import PaletteError

    return (ConfigError, ModelError, StorageError, RecipeFileError, PaletteError, DuplicateSearch, CliError, RemoteError)


def _light_errors():
    from search.service.client import RemoteError

    return (CliError, RemoteError)


def guarded(fn):
    """Turn expected errors into one red line and a non-zero exit, never a traceback."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except _light_errors() as exc:  # checked first: no heavy imports just to print a remote error
            fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, getattr(exc, "code", 2))
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
    from search.driver.driver import SearchFailed, SearchInterrupted
    from search.driver.jobs import run_search
    from search.driver.progress import RichReporter

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
    ctx: typer.Context,
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
    server: Optional[str] = ServerOption,
    token: Optional[str] = TokenOption,
    wait: bool = typer.Option(False, "--wait", help="with --server: follow the search's progress until it ends"),
) -> None:
    """Run the mixed-bit analysis of MODEL's UNet and build recipes (with --server: on the service)."""
    from search.config import SearchConfig, parse_floats, parse_nbits, parse_prompts_file, parse_strategy
    from search.driver.jobs import DuplicateSearch, prepare_search, resolve_config
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
    if server:
        _local_only(ctx, "db", "ray_address")
        body = dict(model=model, workers=workers, nbits=nbits, num_recipes=num_recipes, min_size=min_size,
                    prompts=list(options["prompts"]) if prompts is not None else None, seed=seed, steps=steps,
                    resolution=resolution, batch_size=batch_size, precision=precision, strategy=strategy,
                    targets=targets, evals=evals, anchors=anchors, curves=curves, resume=resume)
        return _remote_submit(server, token, body, wait)
    if wait:
        raise CliError("--wait is for --server (a local search always runs in the foreground)")
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
    ctx: typer.Context,
    search_id: str = typer.Argument(..., help="search id (or a unique prefix)"),
    db: Optional[Path] = DbOption,
    workers: Optional[int] = typer.Option(None, "--workers", "-w"),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", envvar="RAY_ADDRESS"),
    server: Optional[str] = ServerOption,
    token: Optional[str] = TokenOption,
    wait: bool = typer.Option(False, "--wait", help="with --server: follow the search's progress until it ends"),
) -> None:
    """Continue an interrupted or failed search; stored measurements are never recomputed."""
    from search.driver.jobs import prepare_resume

    if server:
        _local_only(ctx, "db", "ray_address")
        return _remote_resume(server, token, search_id, workers, wait)
    if wait:
        raise CliError("--wait is for --server (a local search always runs in the foreground)")

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
    from search.driver.jobs import target_recipe
    from search.driver.progress import RichReporter

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
def cancel(ctx: typer.Context, search_id: str, db: Optional[Path] = DbOption, server: Optional[str] = ServerOption,
           token: Optional[str] = TokenOption) -> None:
    """Stop a running search; its driver stores what it has and marks it cancelled (resumable)."""
    if server:
        _local_only(ctx, "db")
        with _client(server, token) as client:
            s = client.cancel(search_id)
        err.print(f"cancel requested for search {s['id']}; its driver stops within a few seconds")
        return
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
def list_(ctx: typer.Context, db: Optional[Path] = DbOption, as_json: bool = typer.Option(False, "--json"),
          server: Optional[str] = ServerOption, token: Optional[str] = TokenOption) -> None:
    """List the searches in the database (or on the service)."""
    if server:
        _local_only(ctx, "db")
        with _client(server, token) as client:
            rows = client.list()
        where = f"searches on {client.server}"
    else:
        storage = open_storage(db)
        rows = [_summary(storage, s) for s in storage.list_searches()]
        where = f"searches in {storage.path}"
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title=where)
    for col in ("id", "model", "status", "phase", "evaluations", "created (UTC)"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["id"], r["model"], r["status"], r["phase"], str(r["evaluations"]), r["created_at"][:19])
    out.print(table)


def recipe_table(storage, search) -> None:
    """Recipes by falling size; the strategy column only when strategies are mixed (fits 80 columns)."""
    recipes = sorted(storage.recipes(search.id), key=lambda r: -r.avg_bits)
    baselines = storage.baselines(search.id)
    mixed = len({r.strategy for r in recipes}) > 1
    table = Table(title=f"recipes of search {search.id} ({search.model})")
    table.add_column("key", no_wrap=True)
    headers = (["strategy"] if mixed else []) + ["bits", "MB", "thresh dB", "pred dB", "PSNR dB"]
    for col in headers:
        table.add_column(col, justify="left" if col == "strategy" else "right", no_wrap=True)
    pad = [""] if mixed else []
    for name in ("original", "linear_8bit"):
        if name in baselines:
            table.add_row(f"[dim]{name}", *pad, "16.00" if name == "original" else "8.00", "", "", "",
                          f"{baselines[name].psnr:.2f}")
    for r in recipes:
        table.add_row(r.key, *([r.strategy] if mixed else []), f"{r.avg_bits:.2f}", f"{r.size_mb:.2f}",
                      _fmt(r.threshold), _fmt(r.predicted_psnr), f"{r.psnr:.2f}" if r.psnr is not None else "pending")
    out.print(table)


@app.command()
@guarded
def status(ctx: typer.Context, search_id: str, db: Optional[Path] = DbOption,
           as_json: bool = typer.Option(False, "--json"), server: Optional[str] = ServerOption,
           token: Optional[str] = TokenOption,
           wait: bool = typer.Option(False, "--wait", help="with --server: follow the search's progress bars until "
                                     "it ends")) -> None:
    """Show a search: status, phase, measurement counts, recipes."""
    if server:
        _local_only(ctx, "db")
        with _client(server, token) as client:
            info = client.get(search_id)
            if wait:
                return _follow(client, info["id"])
        if as_json:
            print(json.dumps(info, indent=2, default=str))
            return
        _remote_status(info)
        return
    if wait:
        raise CliError("--wait is for --server (locally, the search's own command shows its progress)")
    storage = open_storage(db)
    s = storage.get_search(search_id)
    info = _summary(storage, s)
    info.update(config=s.config, fingerprint=s.fingerprint, elapsed_s=s.elapsed_s, candidates=len(storage.layers(s.id)),
                baselines={k: b.psnr for k, b in storage.baselines(s.id).items()},
                recipes=[{"key": r.key, "avg_bits": r.avg_bits, "size_mb": r.size_mb, "threshold": r.threshold,
                          "psnr": r.psnr, "predicted_psnr": r.predicted_psnr, "strategy": r.strategy,
                          "target": r.target} for r in storage.recipes(s.id)],
                validations={k: asdict(v) for k, v in storage.validations(s.id).items()})
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
    from search.cli.coreml_commands import validation_table

    validations = validation_table(storage, s)
    if validations is not None:
        out.print(validations)


@app.command()
@guarded
def download(ctx: typer.Context, search_id: str,
             output: str = typer.Option(..., "-o", "--output", help="JSON file, or - for stdout"),
             db: Optional[Path] = DbOption, server: Optional[str] = ServerOption,
             token: Optional[str] = TokenOption) -> None:
    """Write the search's recipes and measurements in Apple's JSON format."""
    from search.recipes.apple_json import to_apple_json
    from search.recipes.tables import build_report

    if server:
        _local_only(ctx, "db")
        if output != "-":
            _check_output(Path(output))
        with _client(server, token) as client:
            text = client.recipes_json(search_id)
        if output == "-":
            sys.stdout.write(text if text.endswith("\n") else text + "\n")
            return
        _write_text(Path(output), text if text.endswith("\n") else text + "\n")
        try:
            extra = json.loads(text).get("mbp_search", {})
            what = f" ({len(extra.get('recipe_details', {}))} recipes, status {extra.get('status')})"
        except (ValueError, AttributeError):
            what = ""
        err.print(f"wrote {output}{what}")
        return

    storage = open_storage(db)
    s = storage.get_search(search_id)
    text = json.dumps(to_apple_json(build_report(storage, s)), indent=2, allow_nan=False)
    if output == "-":
        sys.stdout.write(text + "\n")
        return
    _write_text(Path(output), text + "\n")
    err.print(f"wrote {output} ({len(storage.recipes(s.id))} recipes, status {s.effective_status(_now())})")


def _check_output(path: Path) -> None:
    if path.is_dir():
        raise CliError(f"{path} is a directory; give a file name")
    if not path.parent.exists():
        raise CliError(f"directory {path.parent} does not exist")


def _write_text(path: Path, text: str) -> None:
    _check_output(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@app.command()
@guarded
def plot(ctx: typer.Context, search_id: str, output: Path = typer.Option(..., "-o", "--output", help="PNG file"),
         db: Optional[Path] = DbOption, server: Optional[str] = ServerOption,
         token: Optional[str] = TokenOption) -> None:
    """PSNR vs model-size reduction: cumulative curves per bit depth, linear 8-bit, recipes."""
    from search.recipes.plot import plot_report
    from search.recipes.tables import build_report

    if output.suffix.lower() != ".png":
        raise CliError(f"plot output must be a .png file, got {output}")
    if not output.parent.exists():
        raise CliError(f"directory {output.parent} does not exist")
    if server:
        _local_only(ctx, "db")
        _check_output(output)
        with _client(server, token) as client:
            data = client.plot_png(search_id)
        tmp = output.with_name(output.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, output)
        err.print(f"wrote {output}")
        return
    storage = open_storage(db)
    s = storage.get_search(search_id)
    plot_report(build_report(storage, s), output)
    err.print(f"wrote {output}")


# -- remote mode: the same commands against `search serve` ------------------------------------
def _local_only(ctx: typer.Context, *names: str) -> None:
    """Refuse options that only mean something locally when they were given with --server."""
    # typer may vendor its own click: compare the source by name, not by enum identity.
    given = [n for n in names if getattr(ctx.get_parameter_source(n), "name", None) == "COMMANDLINE"]
    if given:
        flags = ", ".join("--" + n.replace("_", "-") for n in given)
        raise CliError(f"{flags} only apply to local searches; with --server the service uses its own")


def _client(server: str, token: Optional[str]):
    from search.service.client import Client

    return Client(server, token)


def _remote_submit(server: str, token: Optional[str], body: dict, wait: bool) -> None:
    from search.service.client import RemoteError

    with _client(server, token) as client:
        try:
            info = client.submit(body)
        except RemoteError as exc:
            existing = exc.body.get("existing")
            if exc.status == 409 and existing:
                raise CliError(f"{str(exc).split(' (HTTP')[0]}; resume it with `search resume {existing} --server "
                               f"{client.server}` or add --resume", 1) from None
            raise
        sid = info["id"]
        out.print(f"search {sid}", highlight=False)
        if not info.get("created", True):
            err.print(f"resuming unfinished search {sid}")
        if wait:
            _follow(client, sid)
        else:
            err.print(f"submitted to {client.server}; watch it with `search status {sid} --server {client.server}`",
                      highlight=False)


def _remote_resume(server: str, token: Optional[str], search_id: str, workers: Optional[int], wait: bool) -> None:
    with _client(server, token) as client:
        info = client.resume(search_id, workers)
        sid = info["id"]
        out.print(f"search {sid}", highlight=False)
        counts = info.get("measurements", {})
        err.print(f"resuming: {sum(counts.values())} measurements already stored {dict(sorted(counts.items()))}")
        if wait:
            _follow(client, sid)


FOLLOW_RECONNECT_S = 120.0


def _follow(client, sid: str, poll_s: float = 1.0) -> None:
    """Poll the service and draw the driver's bars with the local RichReporter until the search ends."""
    import time

    from search.driver.progress import RichReporter
    from storage.records import ACTIVE

    from search.service.client import RemoteError

    run, seen, last_message = None, {}, 0
    unreachable_since = None
    try:
        with RichReporter(err) as reporter:
            while True:
                try:
                    info = client.get(sid)
                    unreachable_since = None
                except RemoteError as exc:
                    # The service restarting (it resumes its searches) is not the end of the search.
                    if exc.status is not None:
                        raise
                    unreachable_since = unreachable_since or time.monotonic()
                    if time.monotonic() - unreachable_since > FOLLOW_RECONNECT_S:
                        raise
                    time.sleep(2)
                    continue
                progress = info.get("progress") or {}
                if progress.get("run") != run:
                    run, seen, last_message = progress.get("run"), {}, 0
                for seq, text in progress.get("messages", []):
                    if seq > last_message:
                        reporter.message(text)
                        last_message = seq
                for i, entry in enumerate(progress.get("phases", [])):
                    key = (i, entry["phase"])
                    if key not in seen:
                        reporter.phase_start(entry["phase"], entry["total"])
                        seen[key] = 0
                    if entry["done"] > seen[key]:
                        reporter.advance(entry["phase"], entry["done"] - seen[key])
                        seen[key] = entry["done"]
                if info["status"] not in ACTIVE and not info.get("running_here"):
                    break
                time.sleep(poll_s)
    except KeyboardInterrupt:
        err.print(f"[yellow]stopped watching:[/] search {sid} goes on at {client.server}; cancel it with "
                  f"`search cancel {sid} --server {client.server}`", highlight=False)
        raise typer.Exit(130) from None
    status = info["status"]
    where = f" --server {client.server}"
    if status == "failed":
        fail(f"search {sid} failed: {info.get('error')}. Fix the cause, then: search resume {sid}{where}", 1)
    if status != "completed":
        err.print(f"[yellow]{status}:[/] every result received is stored. Resume with:\n  search resume {sid}{where}",
                  highlight=False)
        raise typer.Exit(130)
    result = progress.get("result") or {}
    this_run = (f"{result['evaluations']} evaluations this run (+{result['reference_runs']} reference runs)"
                if result.get("evaluations") is not None else "")
    first = f"; first new result after {result['first_result_s']:.1f} s" if result.get("first_result_s") is not None else ""
    err.print(f"[green]search {sid} completed[/]: {this_run}{first}; {info['evaluations']} stored in total, "
              f"{info['elapsed_s']:.1f} s of driver time", highlight=False)
    _remote_recipe_table(info)
    out.print(f"download: search download {sid} -o recipes.json{where}    plot: search plot {sid} -o psnr.png{where}",
              highlight=False)


def _remote_recipe_table(info: dict) -> None:
    table = Table(title=f"recipes of search {info['id']} ({info['model']})")
    table.add_column("key", no_wrap=True)
    for col in ("strategy", "avg bits", "size MB", "threshold dB", "predicted dB", "measured PSNR dB"):
        table.add_column(col, justify="left" if col == "strategy" else "right")
    for name in ("original", "linear_8bit"):
        if name in info.get("baselines", {}):
            table.add_row(f"[dim]{name}", "", "16.00" if name == "original" else "8.00", "", "", "",
                          f"{info['baselines'][name]:.2f}")
    for r in sorted(info.get("recipes", []), key=lambda r: -r["avg_bits"]):
        table.add_row(r["key"], r["strategy"], f"{r['avg_bits']:.2f}", f"{r['size_mb']:.2f}", _fmt(r.get("threshold")),
                      _fmt(r.get("predicted_psnr")), f"{r['psnr']:.2f}" if r.get("psnr") is not None else "pending")
    out.print(table)


def _remote_status(info: dict) -> None:
    n, nb = info["candidates"], len(info["config"]["nbits"])
    m = info.get("measurements", {})
    out.print(f"search [bold]{info['id']}[/]  model {info['model']}  status [bold]{info['status']}[/]  phase "
              f"{info['phase']}", highlight=False)
    out.print(f"candidates {n} × bit depths {info['config']['nbits']}: isolated {m.get('isolated', 0)}/{n * nb}, "
              f"cumulative {m.get('cumulative', 0)}/{n * nb}; pipeline runs stored {info['evaluations']}; "
              f"driver time {info['elapsed_s']:.1f} s", highlight=False)
    if info.get("error"):
        out.print(f"[red]error:[/] {info['error']}", highlight=False)
    _remote_recipe_table(info)


# -- the service -------------------------------------------------------------------------
def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@app.command()
@guarded
def serve(
    host: str = typer.Option("127.0.0.1", "--host", help="address to bind; anything but loopback needs --token"),
    port: int = typer.Option(8765, "--port", help="TCP port"),
    db: Optional[Path] = DbOption,
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", envvar="MBP_SEARCH_DATA_DIR",
                                            help="where the service writes plots and progress [default: <db>.service/]"),
    token: Optional[str] = typer.Option(None, "--token", envvar=TOKEN_ENV,
                                        help=f"clients must send it as a bearer token [env {TOKEN_ENV}]"),
    allow_model_dir: list[Path] = typer.Option([], "--allow-model-dir",
                                               help="a directory whose pipelines remote requests may name by path "
                                                    "(repeatable)"),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", envvar="RAY_ADDRESS",
                                              help="the cluster to run drivers on [default: start a local instance]"),
    resume_interrupted: bool = typer.Option(True, "--resume-interrupted/--no-resume-interrupted",
                                            help="at start-up, resume searches that were interrupted"),
    request_gpus: int = typer.Option(0, "--request-gpus", help="ask the Ray autoscaler for this many GPUs while "
                                     "searches run, and wait for the first one (clusters whose GPU workers scale from 0)"),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn log level"),
) -> None:
    """Run the search service: an HTTP API (OpenAPI at /docs) to submit, watch, resume, cancel and download."""
    import socket

    from storage.engine import check_database_file

    if not _is_loopback(host) and not token:
        raise CliError(f"--host {host} is reachable from other machines: set a token with --token or {TOKEN_ENV} "
                       "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    if token is not None and len(token) < 16:
        raise CliError("the token is too short: use at least 16 characters "
                       "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    if not 0 <= port <= 65535:
        raise CliError(f"--port must be between 0 and 65535, got {port}")
    if request_gpus < 0:
        raise CliError(f"--request-gpus must be 0 or more, got {request_gpus}")
    for d in allow_model_dir:
        if not d.expanduser().is_dir():
            raise CliError(f"--allow-model-dir {d} is not a directory")
    db_path = (db or default_db()).expanduser()
    check_database_file(db_path)
    data_dir = (data_dir or db_path.with_name(db_path.name + ".service")).expanduser()
    if data_dir.exists() and not data_dir.is_dir():
        raise CliError(f"--data-dir {data_dir} is not a directory")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise CliError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None

    import uvicorn

    from search.service.app import create_app

    api = create_app(db_path, data_dir, token=token, allowed_model_dirs=allow_model_dir, ray_address=ray_address,
                     resume_interrupted=resume_interrupted, request_gpus=request_gpus)
    service = api.state.service
    try:
        service.start()  # join Ray and resume interrupted searches before taking requests
    except (ConnectionError, RuntimeError, ValueError) as exc:
        sock.close()
        raise CliError(f"cannot start the Ray connection ({ray_address or 'local'}): "
                       f"{(str(exc).strip().splitlines() or [type(exc).__name__])[0]}") from None
    bound = sock.getsockname()[1]
    err.print(f"search service on http://{host}:{bound} (OpenAPI /docs); database {db_path}; data {data_dir}; "
              f"{service.describe_ray()}; token {'required' if token else 'not required (loopback only)'}",
              highlight=False, soft_wrap=True)
    config = uvicorn.Config(api, host=host, port=bound, log_level=log_level, lifespan="on")
    uvicorn.Server(config).run(sockets=[sock])


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    from search.cli.app import main as canonical_main  # `python -m search.cli.app`: the one module with every command

    canonical_main()
else:
    import search.cli.coreml_commands  # noqa: E402,F401  (registers `search apply` and `search validate`)
