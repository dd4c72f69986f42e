"""Options that several commands share, declared once; the flags of `search submit` come from
the table in search.submit_options (which the service's request body is built from too)."""
from __future__ import annotations

import inspect
from pathlib import Path
import typer
from platformdirs import user_data_dir

from search.cli.console import CliError
from search.submit_options import SEARCH_OPTIONS

DB_ENV = "MBP_SEARCH_DB"
SERVER_ENV = "MBP_SEARCH_SERVER"
TOKEN_ENV = "MBP_SEARCH_TOKEN"


def default_db() -> Path:
    return Path(user_data_dir("mbp-search")) / "searches.db"


DbOption = typer.Option(None, "--db", envvar=DB_ENV, help="SQLite database [default: searches.db in the user data dir]")
ServerOption = typer.Option(None, "--server", envvar=SERVER_ENV, help="URL of a search service (`search serve`) to "
                            "talk to instead of the local database")
TokenOption = typer.Option(None, "--token", envvar=TOKEN_ENV, help="the service's token")
RayOption = typer.Option(None, "--ray-address", envvar="RAY_ADDRESS",
                         help="join a running Ray cluster instead of starting a local one")
WaitOption = typer.Option(False, "--wait", help="with --server: follow the search's progress until it ends")
NodeOption = typer.Option(None, "--coreml-node", help="where the Core ML worker runs: 'coreml' = a node started "
                          "with the custom resource coreml (a Mac), 'any' = any node (everything but Core ML "
                          "prediction) [default: any when Ray runs embedded on Linux, else coreml]")
SearchIdArgument = typer.Argument(..., help="search id (or a unique prefix)")


def search_flags(after: str):
    """Give a command taking ``**flags`` one typer option per entry of SEARCH_OPTIONS, placed in
    its signature (and so in its --help) after the parameter ``after``."""

    def decorate(fn):
        params = list(inspect.signature(fn).parameters.values())
        kwargs = next(p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD)
        params.remove(kwargs)
        flags = [inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, annotation=o.cli_type,
                                   default=typer.Option(o.default, *o.flags, help=o.help)) for o in SEARCH_OPTIONS]
        at = next(i for i, p in enumerate(params) if p.name == after) + 1
        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params]
        fn.__signature__ = inspect.Signature(params[:at] + flags + params[at:])
        return fn

    return decorate


def local_only(ctx: typer.Context, *names: str) -> None:
    """Refuse options that only mean something locally when they were given with --server."""
    # typer may vendor its own click: compare the source by name, not by enum identity.
    given = [n for n in names if getattr(ctx.get_parameter_source(n), "name", None) == "COMMANDLINE"]
    if given:
        flags = ", ".join("--" + n.replace("_", "-") for n in given)
        raise CliError(f"{flags} only apply to local searches; with --server the service uses its own")


__all__ = ["DB_ENV", "SERVER_ENV", "TOKEN_ENV", "default_db", "DbOption", "ServerOption", "TokenOption", "RayOption",
           "WaitOption", "SearchIdArgument", "search_flags", "local_only"]
