"""Progress reporting, kept out of the driver: a no-op reporter and a rich one."""
from __future__ import annotations

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
        label = PHASE_LABELS.get(phase, phase)
        if total == 0:
            self.console.print(f"[dim]{label}: nothing left to do (already stored)")
            return
        self.tasks[phase] = self.progress.add_task(label, total=total)

    def advance(self, phase: str, n: int = 1) -> None:
        if phase in self.tasks:
            self.progress.advance(self.tasks[phase], n)

    def phase_end(self, phase: str) -> None:
        pass

    def message(self, text: str) -> None:
        self.progress.console.print(text)
