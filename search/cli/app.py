"""`search`: the command line. This module only assembles it: each command lives in the module
of its job (search.cli.run_commands, show_commands, serve_command, coreml_commands), which know
nothing of this app, so nothing imports back up to here. ``python -m search.cli.app`` runs it.
"""
from __future__ import annotations

import atexit
import os
import sys

import typer

from search.cli import bundle_commands, coreml_commands, images_command, run_commands, serve_command, show_commands


class _Cli(typer.Typer):
    """The command line as a process: once a command has finished (Ray shut down, the database
    closed, the exit handlers run, the output flushed) the process ends at once, skipping the
    interpreter's teardown of torch, diffusers and Ray, which takes seconds on a busy machine.
    Only the process entry point does this: tests invoking the app in-process are unaffected."""

    def __call__(self, *args, **kwargs):
        try:
            code = _usage_errors(lambda: super(_Cli, self).__call__(*args, standalone_mode=False, **kwargs))
            raise SystemExit(code if isinstance(code, int) else 0)
        except SystemExit as exc:
            code = exc.code
            if code is not None and not isinstance(code, int):
                print(code, file=sys.stderr)
                code = 1
            atexit._run_exitfuncs()
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass
            os._exit(code or 0)


def _usage_errors(call):
    """Run the command line; a refusal of click's own (an unknown option, a missing value) is one
    line ``error: ...`` (lower case, as every other refusal) and exit 2, not a framed box."""
    try:  # typer vendors its own copy of click (typer._click) from 0.2x on, with Abort in typer.exceptions
        from typer import _click as click
        from typer.exceptions import Abort
    except ImportError:  # pragma: no cover
        import click
        from click.exceptions import Abort

    try:
        return call()
    except click.exceptions.NoArgsIsHelpError as exc:  # `search` alone: the help, as before
        print(exc.ctx.get_help())
        return 0
    except click.exceptions.UsageError as exc:
        hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
        print(f"error: {exc.format_message().rstrip('.')}{hint}", file=sys.stderr)
        return exc.exit_code
    except click.exceptions.ClickException as exc:
        print(f"error: {exc.format_message()}", file=sys.stderr)
        return exc.exit_code
    except Abort:
        print("error: aborted", file=sys.stderr)
        return 1


# Plain help (rich_markup_mode=None): every option's full name on its line at any width, no
# "<bool>" after flags, no frame.
app = _Cli(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Mixed-bit palettization recipe search for diffusion UNets (Ray + SQLite + Core ML).")

app.command()(run_commands.submit)
app.command()(run_commands.resume)
app.command()(run_commands.recipe)
app.command()(run_commands.cancel)
app.command("list")(show_commands.list_)
app.command()(show_commands.status)
app.command()(show_commands.download)
app.command()(show_commands.plot)
app.command("images")(images_command.images_cmd)
app.command()(serve_command.serve)
app.command("apply")(coreml_commands.apply_cmd)
app.command("validate")(coreml_commands.validate_cmd)
app.command("bundle")(bundle_commands.bundle_cmd)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
