"""docs/options.md, written from the command line itself: every command, every option with its
flags, value, default, environment variable and help, as `search COMMAND --help` declares them.
A hand-written list falls behind (it lacked --strategy, --targets, --evals, --apply, --server ...);
this one cannot, and tests/search/test_options_doc.py checks the file in the repository equals
what this writes now.

    python -m search.cli.options_doc > docs/options.md
"""
from __future__ import annotations

import re

HEADER = """# Options of every `search` command

Written by `python -m search.cli.options_doc > docs/options.md` from the options the commands
declare (a test keeps it current); `search COMMAND --help` shows the same. The options of
`search submit` that describe the search (formats, protocol, strategy, ...) are also the fields of
the service's `POST /searches` body, with `_` for `-` (`--num-recipes` is `num_recipes`).
More on what they mean: [the measurement protocol](protocol.md), [palette formats](palette-formats.md),
[optimal recipes](optimal-recipes.md), [Core ML](coreml.md), [bundles](bundles.md), [the service](cluster.md).

"""


def anchor(title: str) -> str:
    """The anchor GitHub (and most Markdown renderers) give a heading: lower case, punctuation
    other than - and _ dropped, spaces to -."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ").strip()


def _default(param) -> str:
    if getattr(param, "is_flag", False):
        return "" if param.default is None else ("on" if param.default else "off")
    d = param.default
    return "" if d is None or d == () or callable(d) else f"`{d}`"


def _option(param, ctx) -> str:
    """``--workers` / `-w` `INT``: the flags, then the value's type (none for a flag)."""
    if param.param_type_name == "argument":
        return f"`{param.name.upper()}` (argument)"
    names = " / ".join(f"`{o}`" for o in [*param.opts, *param.secondary_opts])
    value = "" if param.is_flag else (param.display_type(ctx) or "").strip("<>").upper()
    return names + (f" `{value}`" if value else "")


def command_rows(command) -> list[str]:
    try:  # typer vendors its own copy of click (typer._click) from 0.2x on
        from typer import _click as click
    except ImportError:  # pragma: no cover
        import click

    ctx = click.Context(command)
    rows = ["| option | default | environment | meaning |", "| --- | --- | --- | --- |"]
    for p in command.params:
        if p.name == "help":
            continue
        env = p.envvar if isinstance(p.envvar, str) else ", ".join(p.envvar or ())
        rows.append(f"| {_option(p, ctx)} | {_cell(_default(p))} | {f'`{env}`' if env else ''} | {_cell(getattr(p, 'help', '') or '')} |")
    return rows


def render() -> str:
    from typer.main import get_command

    from search.cli.app import app

    group = get_command(app)
    names = list(group.commands)
    parts = [HEADER, "Commands: " + ", ".join(f"[{n}](#{anchor('search ' + n)})" for n in names) + ".\n"]
    for name in names:
        cmd = group.commands[name]
        summary = (cmd.help or "").strip().split("\n\n")[0].replace("\n", " ")
        parts.append(f"\n## search {name}\n\n{summary}\n\n" + "\n".join(command_rows(cmd)) + "\n")
    return "".join(parts)


def main() -> None:  # pragma: no cover
    print(render(), end="")


if __name__ == "__main__":  # pragma: no cover
    main()
