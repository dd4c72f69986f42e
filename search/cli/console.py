"""How the command line speaks: results on stdout (``out``), everything else on stderr (``err``),
and every expected failure as one red ``error:`` line with a non-zero exit, never a traceback."""
from __future__ import annotations

import functools
from typing import Optional

import typer
from rich.console import Console

from common.errors import first_line

out = Console()
err = Console(stderr=True)


def fmt(value: Optional[float]) -> str:
    """A number in a table: two decimals, '-' when missing."""
    return f"{value:.2f}" if value is not None else "-"


class CliError(Exception):
    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def duplicate_error(message: str, existing: str, where: str) -> CliError:
    """An unfinished search with the same model and config exists: say how to resume it (exit 1)."""
    return CliError(f"{message}; resume it with `search resume {existing}{where}` or add --resume", 1)


def fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _light_errors():
    from search.service.client import RemoteError

    return (CliError, RemoteError)


def _known_errors():
    from search.config import ConfigError
    from search.driver.jobs import DuplicateSearch
    from search.recipes.apple_json import RecipeFileError
    from search.service.client import RemoteError
    from storage import StorageError
    from workers.models import ModelError
    from workers.palettize import PaletteError

    return (ConfigError, ModelError, StorageError, RecipeFileError, PaletteError, DuplicateSearch, CliError, RemoteError)


def guarded(fn):
    """Turn expected errors into one red line and a non-zero exit, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except _light_errors() as exc:  # checked first: no heavy imports just to print a remote error
            fail(first_line(exc), getattr(exc, "code", 2))
        except _known_errors() as exc:
            fail(first_line(exc), getattr(exc, "code", 2))
        except KeyboardInterrupt:
            fail("interrupted", 130)

    return wrapper


def call_driver(fn, **kwargs):
    """Run ``fn``; ApplyError becomes the CLI's one red line; Ray stops if this command started it."""
    import ray

    from search.driver.cluster import shutdown_ray
    from search.driver.coreml_jobs import ApplyError

    started_here = not ray.is_initialized()
    try:
        return fn(**kwargs)
    except ApplyError as exc:
        raise CliError(str(exc)) from None
    finally:
        if started_here:
            shutdown_ray()
