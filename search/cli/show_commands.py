"""`search list`, `status`, `download` and `plot`: the commands that read searches. One code path
each over a backend (search.cli.backend): the local database, or the service with --server."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from common.files import atomic_write_bytes, atomic_write_text
from search.cli import views
from search.cli.backend import open_backend
from search.cli.console import CliError, err, guarded, out
from search.cli.options import DbOption, SearchIdArgument, ServerOption, TokenOption

JsonOption = typer.Option(False, "--json")


def _check_output(path: Path) -> None:
    if path.is_dir():
        raise CliError(f"{path} is a directory; give a file name")
    if not path.parent.exists():
        raise CliError(f"directory {path.parent} does not exist")


@guarded
def list_(ctx: typer.Context, db: Optional[Path] = DbOption, as_json: bool = JsonOption,
          server: Optional[str] = ServerOption, token: Optional[str] = TokenOption) -> None:
    """List the searches in the database (or on the service)."""
    with open_backend(ctx, db, server, token) as backend:
        rows, place = backend.list(), backend.place
    if as_json:
        return views.print_json(rows)
    views.print_uncut(views.searches_table(rows, place))


@guarded
def status(ctx: typer.Context, search_id: str = SearchIdArgument, db: Optional[Path] = DbOption,
           as_json: bool = JsonOption, server: Optional[str] = ServerOption, token: Optional[str] = TokenOption,
           wait: bool = typer.Option(False, "--wait", help="with --server: follow the search's progress bars until "
                                     "it ends")) -> None:
    """Show a search: status, phase, measurement counts, recipes."""
    with open_backend(ctx, db, server, token) as backend:
        if wait and backend.runs_here:
            raise CliError("--wait is for --server (locally, the search's own command shows its progress)")
        info = backend.detail(search_id)
        if wait:
            info, ended = backend.run(info["id"])
            return views.run_ended(info, ended, backend.where, backend.resume_where)
    if as_json:
        return views.print_json(info)
    views.status(info)


@guarded
def download(ctx: typer.Context, search_id: str = SearchIdArgument,
             output: str = typer.Option(..., "-o", "--output", help="JSON file, or - for stdout; with --mlpackage "
                                        "the directory for the .mlpackage folders, with --bundle the directory "
                                        "for the bundles' folders (DIR/<key>)"),
             mlpackage: Optional[str] = typer.Option(None, "--mlpackage", help="instead: the Core ML packages the "
                                                     "cluster made (search submit --apply / search apply --server), "
                                                     "a recipe key or 'all'; each is checked against its sha256"),
             bundle: Optional[str] = typer.Option(None, "--bundle", help="instead: the Resources folders for Apple's "
                                                  "Swift pipeline the cluster built (search submit --apply / search "
                                                  "apply --server), a recipe key or 'all'; each is checked against "
                                                  "its sha256 and unpacked to DIR/<key>"),
             db: Optional[Path] = DbOption, server: Optional[str] = ServerOption,
             token: Optional[str] = TokenOption) -> None:
    """Write the search's recipes and measurements in Apple's JSON format (or its Core ML packages,
    or its Resources folders for Apple's Swift pipeline)."""
    if mlpackage is not None and bundle is not None:
        raise CliError("--mlpackage and --bundle download different things: give one of them")
    if bundle is not None:
        return _download_bundles(ctx, search_id, bundle, output, db, server, token)
    if mlpackage is not None:
        from search.cli.packages import download_packages

        if output == "-":
            raise CliError("--mlpackage needs -o DIR (a directory), not -")
        with open_backend(ctx, db, server, token) as backend:
            got = download_packages(backend, search_id, mlpackage, Path(output))
        for key, path, facts in got:
            out.print(f"{key}: {path} ({facts['size_bytes'] / 1e6:.2f} MB zip, sha256 {facts['sha256'][:16]}... "
                      "checked)", highlight=False, soft_wrap=True)
        return
    with open_backend(ctx, db, server, token) as backend:
        if output != "-":
            _check_output(Path(output))
        text, facts = backend.recipes_json(search_id)
    if output == "-":
        sys.stdout.write(text)
        return
    atomic_write_text(output, text)
    err.print(f"wrote {output}" + (f" ({facts['recipes']} recipes, status {facts['status']})" if facts else ""))
    note = apple_script_note(text)
    if note:
        err.print(f"[yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)


def apple_script_note(text: str) -> str | None:
    """One line when Apple's mixed_bit_compression_apply.py cannot load the JSON's model_version
    (it calls DiffusionPipeline.from_pretrained on it): built-in models and local directories."""
    import json

    from workers.arch_models import ARCH_MODELS
    from workers.tiny_models import BUILTIN_MODELS

    try:
        version = json.loads(text).get("model_version")
    except (ValueError, AttributeError):
        return None
    if not isinstance(version, str):
        return None
    how = "use `search bundle` or `search apply --mlpackage` instead of Apple's apply script"
    if version in BUILTIN_MODELS or version in ARCH_MODELS:
        return f"model_version '{version}' is a built-in model of this project, which Apple's apply script cannot load; {how}"
    if version.startswith(("/", ".", "~")) or Path(version).expanduser().is_dir():
        return (f"model_version '{version}' is a local directory: Apple's apply script loads it only on a machine "
                f"that has it at that path; {how}")
    return None


def _download_bundles(ctx: typer.Context, search_id: str, choice: str, output: str, db, server, token) -> None:
    from search.cli.packages import download_bundles

    if output == "-":
        raise CliError("--bundle needs -o DIR (a directory), not -")
    with open_backend(ctx, db, server, token) as backend:
        got = download_bundles(backend, search_id, choice, Path(output))
    for key, path, facts in got:
        what = "Core AI folder" if "luts_ok" in facts else "Resources folder"  # --target coreai (issue 36)
        out.print(f"{key}: {path} ({what} {facts['total_bytes'] / 1e6:.2f} MB, zip sha256 "
                  f"{facts['sha256'][:16]}... checked)", highlight=False, soft_wrap=True)
    if any("options" in facts and not facts["options"].get("compile") for _, _, facts in got):
        err.print("the folders hold .mlpackage files: compile them on a Mac (README.txt in each folder) before "
                  "Swift's resourcesAt: loads them", highlight=False)


@guarded
def plot(ctx: typer.Context, search_id: str = SearchIdArgument,
         output: Path = typer.Option(..., "-o", "--output", help="PNG file"), db: Optional[Path] = DbOption,
         server: Optional[str] = ServerOption, token: Optional[str] = TokenOption) -> None:
    """PSNR vs model-size reduction: cumulative curves per bit depth, linear 8-bit, recipes."""
    if output.suffix.lower() != ".png":
        raise CliError(f"plot output must be a .png file, got {output}")
    if not output.parent.exists():
        raise CliError(f"directory {output.parent} does not exist")
    with open_backend(ctx, db, server, token) as backend:
        _check_output(output)
        data = backend.plot_png(search_id)
    atomic_write_bytes(output, data)
    err.print(f"wrote {output}")
