"""Progress reporting, kept out of the driver: a no-op reporter, redrawn bars for a terminal and
plain lines for a log (`console_reporter` picks one)."""
from __future__ import annotations

import time
from typing import Protocol

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

PHASE_LABELS = {
    "preparing": "fetch model weights (MB)",
    "palettes": "fit palettes (k-means)",
    "isolated": "isolated impact + baselines",
    "refine": "isolated impact, refined",
    "candidates": "measured refinement",
    "cumulative": "cumulative curves",
    "recipes": "measure recipes",
}


class Reporter(Protocol):
    def phase_start(self, phase: str, total: int) -> None: ...
    def advance(self, phase: str, n: int = 1) -> None: ...
    def phase_end(self, phase: str) -> None: ...
    def message(self, text: str) -> None: ...


class NullReporter:
    def phase_start(self, phase: str, total: int) -> None:
        pass

    def advance(self, phase: str, n: int = 1) -> None:
        pass

    def phase_end(self, phase: str) -> None:
        pass

    def message(self, text: str) -> None:
        pass


class RichReporter:
    """One bar per phase with count and ETA; messages print above the bars."""

    def __init__(self, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.progress = Progress(
            TextColumn("{task.description:<30}"), BarColumn(), MofNCompleteColumn(), TextColumn("•"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=self.console, transient=False,
        )
        self.tasks: dict[str, int] = {}

    def __enter__(self) -> "RichReporter":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def phase_start(self, phase: str, total: int) -> None:
        """A phase started again (each refinement step) extends its bar instead of adding one."""
        label = PHASE_LABELS.get(phase, phase)
        if total == 0:
            if phase not in self.tasks:
                self.console.print(f"[dim]{label}: nothing left to do (already stored)")
            return
        if phase in self.tasks:
            task = self.progress.tasks[self.tasks[phase]]
            self.progress.update(self.tasks[phase], total=(task.total or 0) + total)
            return
        self.tasks[phase] = self.progress.add_task(label, total=total)

    def advance(self, phase: str, n: int = 1) -> None:
        if phase in self.tasks:
            self.progress.advance(self.tasks[phase], n)

    def phase_end(self, phase: str) -> None:
        pass

    def message(self, text: str) -> None:
        self.progress.console.print(text)


class PlainReporter:
    """For a log, not a terminal: no bars, one line when a phase ends (a phase started again, as
    each refinement step is, is summed into one line at the end) and a final summary."""

    REPEATED = frozenset({"candidates"})

    def __init__(self, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.done: dict[str, list] = {}  # phase -> [done, total, seconds, started or None]

    def __enter__(self) -> "PlainReporter":
        return self

    def __exit__(self, *exc) -> None:
        for phase in self.REPEATED & set(self.done):
            self._line(phase)
        if self.done:
            self.console.print("phases: " + ", ".join(f"{PHASE_LABELS.get(p, p)} {d[0]}/{d[1]}"
                                                      for p, d in self.done.items()), highlight=False, soft_wrap=True)

    def phase_start(self, phase: str, total: int) -> None:
        d = self.done.setdefault(phase, [0, 0, 0.0, None])
        d[1] += total
        d[3] = time.monotonic()

    def advance(self, phase: str, n: int = 1) -> None:
        if phase in self.done:
            self.done[phase][0] += n

    def phase_end(self, phase: str) -> None:
        d = self.done.get(phase)
        if d is None or d[3] is None:
            return
        d[2] += time.monotonic() - d[3]
        d[3] = None
        if phase not in self.REPEATED:
            self._line(phase)

    def _line(self, phase: str) -> None:
        done, total, seconds, _ = self.done[phase]
        label = PHASE_LABELS.get(phase, phase)
        text = "nothing left to do (already stored)" if total == 0 else f"{done}/{total} in {seconds:.1f} s"
        self.console.print(f"{label}: {text}", highlight=False, soft_wrap=True)

    def message(self, text: str) -> None:
        self.console.print(text, soft_wrap=True)


def console_reporter(console: Console):
    """Redrawn bars on a terminal; plain lines when the output goes to a file or a pipe."""
    return RichReporter(console) if console.is_terminal else PlainReporter(console)
