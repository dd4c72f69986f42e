"""`search`: the command line. This module only assembles it: each command lives in the module
of its job (search.cli.run_commands, show_commands, serve_command, coreml_commands), which know
nothing of this app, so nothing imports back up to here. ``python -m search.cli.app`` runs it.
"""
from __future__ import annotations

import atexit
import os
import sys

import typer

from search.cli import bundle_commands, coreml_commands, run_commands, serve_command, show_commands


class _Cli(typer.Typer):
    """The command line as a process: once a command has finished (Ray shut down, the database
    closed, the exit handlers run, the output flushed) the process ends at once, skipping the
    interpreter's teardown of torch, diffusers and Ray, which takes seconds on a busy machine.
    Only the process entry point does this: tests invoking the app in-process are unaffected."""

    def __call__(self, *args, **kwargs):
        try:
            return super().__call__(*args, **kwargs)
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


app = _Cli(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Mixed-bit palettization recipe search for diffusion UNets (Ray + SQLite + Core ML).")

app.command()(run_commands.submit)
app.command()(run_commands.resume)
app.command()(run_commands.recipe)
app.command()(run_commands.cancel)
app.command("list")(show_commands.list_)
app.command()(show_commands.status)
app.command()(show_commands.download)
app.command()(show_commands.plot)
app.command()(serve_command.serve)
app.command("apply")(coreml_commands.apply_cmd)
app.command("validate")(coreml_commands.validate_cmd)
app.command("bundle")(bundle_commands.bundle_cmd)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
