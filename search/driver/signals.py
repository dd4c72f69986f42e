"""SIGINT / SIGTERM ask the driver to stop after the items in flight (everything stored is kept);
the previous handlers come back afterwards. Only the main thread can install handlers. How a
stopped or failed search ends its driver (`SearchInterrupted`, `SearchFailed`) lives here too,
so every phase module can raise them."""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager


class SearchInterrupted(RuntimeError):
    pass


class SearchFailed(RuntimeError):
    pass


@contextmanager
def stop_on_signals(request_stop):
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
