"""What a search prints while it runs: redrawn bars on a terminal, plain lines in a log."""
import io

from rich.console import Console

from search.driver.progress import PlainReporter, RichReporter, console_reporter


def _run(reporter) -> None:
    """A search's reporting as the driver does it: phases, then 60 refinement steps of 1 each."""
    with reporter:
        reporter.phase_start("preparing", 5)
        reporter.advance("preparing", 5)
        reporter.phase_end("preparing")
        reporter.phase_start("isolated", 104)
        reporter.advance("isolated", 104)
        reporter.phase_end("isolated")
        reporter.phase_start("cumulative", 0)  # all stored already
        reporter.phase_end("cumulative")
        reporter.message("a message")
        for _ in range(60):
            reporter.phase_start("candidates", 1)
            reporter.advance("candidates")
            reporter.phase_end("candidates")


def test_without_a_terminal_one_line_per_phase_and_a_summary():
    buf = io.StringIO()
    console = Console(file=buf, width=120)
    assert not console.is_terminal and isinstance(console_reporter(console), PlainReporter)
    _run(console_reporter(console))
    lines = buf.getvalue().splitlines()
    assert [ln.split(":")[0] for ln in lines] == [
        "fetch model weights (MB)", "isolated impact + baselines", "cumulative curves", "a message",
        "measured refinement", "phases"], lines
    assert lines[1].startswith("isolated impact + baselines: 104/104 in ")
    assert lines[2] == "cumulative curves: nothing left to do (already stored)"
    assert lines[4].startswith("measured refinement: 60/60 in ")  # one line for the 60 steps
    assert "isolated impact + baselines 104/104" in lines[5] and "measured refinement 60/60" in lines[5]


def test_on_a_terminal_a_phase_started_again_extends_its_bar():
    console = Console(file=io.StringIO(), width=120, force_terminal=True)
    assert isinstance(console_reporter(console), RichReporter)
    reporter = RichReporter(console)
    _run(reporter)
    tasks = {t.description: (t.completed, t.total) for t in reporter.progress.tasks}
    assert tasks["measured refinement"] == (60, 60) and len(reporter.progress.tasks) == 3
