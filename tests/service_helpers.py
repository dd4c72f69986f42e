"""`search serve`'s app run in a thread of the test process (uvicorn on a free loopback port), for
tests that read a finished search through the service without starting a service process."""
from __future__ import annotations

import contextlib
import threading
import time


@contextlib.contextmanager
def serving(app, timeout: float = 60):
    """Serve ``app`` until the block ends; yields its base URL."""
    import uvicorn

    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the service did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{srv.servers[0].sockets[0].getsockname()[1]}"
    finally:
        srv.should_exit = True
        thread.join(30)
