"""The running driver's progress bars as a small JSON file: written by the driver task, read by
the service (``GET /searches/{id}``) so `search submit --server --wait` draws the same bars and
the dashboard shows each phase's wall time."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from common.clock import utcnow
from common.files import atomic_write_text
from search.read_models import iso

log = logging.getLogger("mbp_search.service")

PROGRESS_WRITE_S = 0.5   # the driver rewrites its progress file at most this often
KEEP_MESSAGES = 100


class ProgressFile:
    """A `search.driver.progress.Reporter` that keeps the driver's bars in a JSON file
    (atomically replaced, at most every PROGRESS_WRITE_S): phases with their totals and done
    counts, the last messages, and the run's result when it completed."""

    def __init__(self, path: Path, run: str):
        self.path = path
        self.state: dict = {"run": run, "started_at": iso(utcnow()), "phases": [], "messages": [], "seq": 0,
                            "result": None}
        self._last = 0.0
        self.write()

    def phase_start(self, phase: str, total: int) -> None:
        self.state["phases"].append({"phase": phase, "total": int(total), "done": 0, "started_at": iso(utcnow()),
                                     "ended_at": None})  # the dashboard shows each phase's wall time
        self.write()

    def advance(self, phase: str, n: int = 1) -> None:
        for entry in reversed(self.state["phases"]):
            if entry["phase"] == phase:
                entry["done"] += n
                break
        if time.monotonic() - self._last >= PROGRESS_WRITE_S:
            self.write()

    def phase_end(self, phase: str) -> None:
        for entry in reversed(self.state["phases"]):
            if entry["phase"] == phase:
                entry["ended_at"] = iso(utcnow())
                break
        self.write()

    def message(self, text: str) -> None:
        self.state["seq"] += 1
        self.state["messages"] = (self.state["messages"] + [[self.state["seq"], str(text)]])[-KEEP_MESSAGES:]
        self.write()

    def finish(self, **result) -> None:
        self.state["result"] = result
        self.write()

    def write(self) -> None:
        self._last = time.monotonic()
        self.state["updated_at"] = iso(utcnow())
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, json.dumps(self.state))
        except OSError as exc:  # progress is a convenience: never fail a search for it
            log.warning("cannot write progress file %s: %s", self.path, exc)


def read_progress(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
