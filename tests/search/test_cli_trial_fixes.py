"""The command line fixes of issue 31's trial: a failing command creates no database file, every
refusal (click's own too) is one lower-case ``error:`` line with exit 2, --help is plain (no
``<bool>``, option names whole at 80 columns), messages never show a Python dict, `status` lists
each phase's wall time, docs/options.md is what the declared options say (and its links work).

Most run the app in-process (typer's CliRunner: the same commands, without a Python start-up
each); the refusals of click itself are printed by the process entry point, so those run as a
user runs them.
"""
from __future__ import annotations

import re
from datetime import datetime, timedelta

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from search.cli.app import app
from tests.cli_helpers import ROOT, error_line, run_cli

COMMANDS = sorted(get_command(app).commands)


def invoke(*args, width: int = 200):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": str(width), "MBP_SEARCH_DB": ""},
                              terminal_width=width)


@pytest.mark.parametrize("args", [
    ["status", "abc"], ["download", "abc", "-o", "-"], ["plot", "abc", "-o", "x.png"], ["cancel", "abc"],
    ["resume", "abc"], ["recipe", "abc", "--bits", "4"], ["validate", "abc"],
])
def test_a_failing_command_creates_no_database(tmp_path, args):
    db = tmp_path / "typo.db"
    r = invoke(*args, "--db", db)
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert lines == [f"error: no database at {db}: nothing was searched there yet (`search submit` creates it; "
                     "--db or MBP_SEARCH_DB picks another)"], r.output
    assert list(tmp_path.iterdir()) == []  # no file, no -wal, no palettes folder


def test_list_of_a_missing_database_is_empty_and_creates_nothing(tmp_path):
    r = invoke("list", "--db", tmp_path / "none.db")
    assert r.exit_code == 0 and "none.db" in r.output, r.output
    assert list(tmp_path.iterdir()) == []


def test_clicks_own_refusals_are_one_lower_case_error_line(tmp_path, model_cache):
    for args, expected in ((["status", "--bogus"], "error: No such option: --bogus"),
                           (["status"], "error: Missing argument 'search_id'")):
        proc = run_cli(*args, "--db", tmp_path / "s.db", model_cache=model_cache)
        assert proc.returncode == 2, proc.stderr
        assert error_line(proc).startswith(expected), proc.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", COMMANDS)
def test_help_is_plain_and_never_cuts_an_option_name(command):
    r = invoke(command, "--help", width=80)
    assert r.exit_code == 0, r.output
    assert "<bool>" not in r.output and "╭" not in r.output
    assert all(len(line) <= 80 for line in r.output.splitlines()), r.output
    cmd = get_command(app).commands[command]
    words = set(re.findall(r"--[\w-]+", r.output))
    for p in cmd.params:  # every flag of the command, whole, as declared
        for flag in [*p.opts, *getattr(p, "secondary_opts", [])]:
            if flag.startswith("--"):
                assert flag in words, (command, flag)


def test_options_doc_is_the_declared_options_and_its_links_work():
    from search.cli.options_doc import anchor, render

    text = (ROOT / "docs" / "options.md").read_text()
    assert text == render(), "docs/options.md is stale: python -m search.cli.options_doc > docs/options.md"
    # Every option of every command is listed under its command (the trial found --strategy,
    # --targets, --evals, --apply, --server missing from the hand-written list).
    sections = dict(re.findall(r"^## search (\w+)\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M))
    assert sorted(sections) == COMMANDS
    for name in COMMANDS:
        for p in get_command(app).commands[name].params:
            if p.name != "help" and p.param_type_name == "option":
                assert f"`{p.opts[0]}`" in sections[name], (name, p.opts[0])
    for flag in ("--strategy", "--targets", "--evals", "--apply", "--server"):
        assert f"`{flag}`" in sections["submit"], flag
    headings = {anchor(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}
    for target in re.findall(r"\]\(([^)]+)\)", text):
        if target.startswith("#"):
            assert target[1:] in headings, target
        else:
            assert (ROOT / "docs" / target).is_file(), target
    assert anchor("search submit") == "search-submit" and anchor("A `b`, c!") == "a-b-c"


def test_messages_show_no_python_dicts():
    from search.cli.views import counts_text, target_recipe_table, target_text

    assert target_text({"avg_bits": 5.0}) == "at most 5 bits per weight"
    assert target_text({"size_mb": 12.5, "refine_evals": 4}) == "at most 12.5 MB"
    assert target_text({"psnr": 40.0}) == "at least 40 dB"
    assert counts_text({"isolated": 12, "cumulative": 3}) == "cumulative 3, isolated 12"
    assert counts_text({}) == "none"
    table = target_recipe_table({"key": "k", "target": {"avg_bits": 4.0}, "avg_bits": 3.9, "size_mb": 1.0,
                                 "predicted_psnr": 30.0, "psnr": 29.0})
    assert table.title == "optimal recipe for at most 4 bits per weight"


def _entry(phase, total, done, start, seconds):
    iso = lambda t: t.isoformat() + "Z"  # noqa: E731 - as search.read_models.iso writes them
    return {"phase": phase, "total": total, "done": done, "started_at": iso(start),
            "ended_at": iso(start + timedelta(seconds=seconds)) if seconds is not None else None}


def test_phase_rows_one_row_per_phase_with_summed_counts_and_wall_times():
    from search.phase_rows import phase_rows

    t0 = datetime(2026, 1, 1, 12, 0, 0)
    entries = [_entry("palettes", 10, 10, t0, 3.0), _entry("isolated", 20, 20, t0, 7.5)]
    entries += [_entry("candidates", 1, 1, t0 + timedelta(seconds=i), 0.25 * (i + 1)) for i in range(12)]
    entries += [_entry("recipes", 3, 1, t0, None)]  # still running
    rows = phase_rows({"phases": entries}, now=t0 + timedelta(seconds=5))
    # The reference: a plain loop over the entries, grouped by phase in order of first start.
    expected, order = {}, []
    for e in entries:
        if e["phase"] not in expected:
            order.append(e["phase"])
            expected[e["phase"]] = [0, 0, 0, 0.0]
        start = datetime.fromisoformat(e["started_at"][:-1])
        end = datetime.fromisoformat(e["ended_at"][:-1]) if e["ended_at"] else t0 + timedelta(seconds=5)
        x = expected[e["phase"]]
        x[0] += e["done"]; x[1] += e["total"]; x[2] += 1; x[3] += (end - start).total_seconds()  # noqa: E702
    assert [r["phase"] for r in rows] == order
    for r in rows:
        assert [r["done"], r["total"], r["runs"], r["wall_s"]] == expected[r["phase"]], r
    labels = {r["phase"]: r["label"] for r in rows}
    assert labels["candidates"] == "measured refinement (12 steps)" and labels["isolated"] == "isolated impact + baselines"
    # A search that no longer runs: an entry never ended counts for nothing.
    assert {r["phase"]: r["wall_s"] for r in phase_rows({"phases": entries})}["recipes"] is None


def test_status_lists_each_phase_with_its_wall_time(tmp_path, monkeypatch):
    from search.cli import views

    printed = []
    monkeypatch.setattr(views.out, "print", lambda text="", *a, **k: printed.append(str(text)))
    views.phase_lines([{"label": "isolated impact + baselines", "done": 96, "total": 96, "wall_s": 61.04},
                       {"label": "measured refinement (12 steps)", "done": 12, "total": 12, "wall_s": 3.0},
                       {"label": "measure recipes", "done": 1, "total": None, "wall_s": None}])
    assert printed == ["phases: isolated impact + baselines 96/96 in 61.0 s; measured refinement (12 steps) 12/12 "
                       "in 3.0 s; measure recipes 1/?"]
