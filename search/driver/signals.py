"""Ctrl-C and SIGTERM in a process that runs searches.

The first signal asks every driver running here to stop (their pool loops notice it within a
second and return; everything stored is kept) and, unless the main thread is inside such a loop
or another step that ends by itself within seconds (`deferred`), raises KeyboardInterrupt there: a step that never looks at the stop request (loading
a model, starting Ray, waiting for the evaluators' start-up) ends at once too, and the driver
stores the search as interrupted. The second signal does not wait for anything: it ends the
processes of the local Ray instance and exits with 130 (`search resume` continues the search,
whose driver is then seen gone). The previous handlers come back afterwards. Only the main thread
can install handlers; elsewhere (the service's driver threads) this is a no-op. How a stopped or
failed search ends its driver (`SearchInterrupted`, `SearchFailed`) lives here too, so every
phase module can raise them.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Callable

INTERRUPTED_EXIT = 130
_cleanups: list[Callable] = []  # see on_hard_exit
_stops: list[Callable] = []  # request_stop of every driver running under the installed handlers
_state = {"installed": False, "deferred": 0, "signals": 0}


def on_hard_exit(cleanup: Callable) -> None:
    """Run ``cleanup`` before a second signal's immediate exit (quick: it must not wait)."""
    if cleanup not in _cleanups:
        _cleanups.append(cleanup)


def _hard_exit() -> None:
    try:
        sys.stderr.write("\ninterrupted again: exiting now (search resume continues the search)\n")
        sys.stderr.flush()
        for cleanup in _cleanups:
            cleanup()
    finally:
        os._exit(INTERRUPTED_EXIT)


def _on_signal(signum, frame) -> None:
    _state["signals"] += 1
    if _state["signals"] > 1:
        _hard_exit()
    for stop in list(_stops):
        stop()
    if not _state["deferred"]:
        raise KeyboardInterrupt


class SearchInterrupted(RuntimeError):
    pass


class SearchFailed(RuntimeError):
    pass


@contextmanager
def stop_on_signals(request_stop: Callable | None = None):
    """Handle SIGINT / SIGTERM as above while inside; ``request_stop`` (a driver's) is called on
    the first one. Nested uses only add their ``request_stop``."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if request_stop is not None:
        _stops.append(request_stop)
    previous = None
    if not _state["installed"]:
        previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        _state.update(installed=True, deferred=0, signals=0)
    try:
        yield
    finally:
        if request_stop is not None:
            _stops.remove(request_stop)
        if previous is not None:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            _state["installed"] = False


def reclaim() -> None:
    """Starting Ray installs its own SIGTERM handler (a crash report, then exit 1): ours again."""
    if _state["installed"] and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _on_signal)


@contextmanager
def deferred():
    """The main thread is in a loop that checks the stop request at least every second, or in a
    step that must not be cut short (shutting Ray down): a first signal raises nothing there."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _state["deferred"] += 1
    try:
        yield
    finally:
        _state["deferred"] -= 1

