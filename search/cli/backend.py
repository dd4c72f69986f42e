"""Where the commands' searches live: the local database (`LocalBackend`) or a search service
(`RemoteBackend`, with --server). Both offer the methods of `Backend` and return the same plain
dicts (search.read_models), so every command has one code path and only the "where" differs.
Each backend module is imported only when chosen: `search --help` loads neither SQLAlchemy nor
httpx, and remote commands never load the driver.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Protocol

import typer

from search.cli.options import local_only


class Backend(Protocol):
    place: str           # "in <db>" / "on <url>", for titles
    where: str           # what to append to a command printed for the user ("" / " --server <url>")
    resume_where: str    # the same, for the resume command after an interruption
    runs_here: bool      # a submitted or resumed search runs in this process (else on the service)

    def __enter__(self) -> "Backend": ...
    def __exit__(self, *exc) -> None: ...
    def list(self) -> list[dict]: ...
    def detail(self, search_id: str) -> dict: ...
    def recipes_json(self, search_id: str) -> tuple[str, Optional[dict]]:
        """Apple's JSON text, and what to say about it ({"recipes": n, "status": s}) when known."""
    def plot_png(self, search_id: str) -> bytes: ...
    def coreml(self, search_id: str) -> dict:
        """``{"id", "status", "coreml": read_models.coreml_progress, "bundles": read_models.bundles}``
        (the packages and bundles with size and sha256)."""
    def fetch_package(self, search_id: str, key: str, fh, kind: str = "mlpackage") -> None:
        """Append recipe ``key``'s zip (``kind`` mlpackage or bundle) to binary file ``fh`` from its
        current position (resumes)."""
    def cancel(self, search_id: str) -> dict: ...
    def submit(self, request: dict) -> dict:
        """``request``: the service's submit body (model, workers, resume, the search options).
        Returns the search's summary plus ``created``."""
    def resume(self, search_id: str, workers: Optional[int] = None) -> dict: ...
    def run(self, search_id: str, workers: Optional[int] = None,
            ray_address: Optional[str] = None) -> tuple[dict, dict]:
        """Run the search here (local) or follow it (remote) until it ends: (detail, how it
        ended) for views.run_ended."""


def open_backend(ctx: typer.Context, db: Optional[Path], server: Optional[str], token: Optional[str],
                 local: tuple[str, ...] = ("db",)) -> Backend:
    """The service at ``server`` (refusing the ``local`` options when they were given), else the
    local database ``db``."""
    if server:
        local_only(ctx, *local)
        from search.cli.remote_backend import RemoteBackend

        return RemoteBackend(server, token)
    from search.cli.local_backend import LocalBackend

    return LocalBackend(db)
