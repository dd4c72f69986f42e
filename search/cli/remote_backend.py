"""A search service (`search serve`) as the commands' backend, through the HTTP client: searches
run on the service; `run` follows one, drawing the driver's bars from its progress file (the
interface is described in search.cli.backend)."""
from __future__ import annotations

import json
import time
from typing import Optional

import typer

from search.cli.console import duplicate_error, err
from search.service.client import Client, RemoteError

FOLLOW_RECONNECT_S = 120.0
TARGET_TIMEOUT_S = 3600.0  # `search recipe --server` waits while the service measures and refines the recipe


class RemoteBackend:
    runs_here = False

    def __init__(self, server: str, token: Optional[str]):
        self.client = Client(server, token)
        self.server = self.client.server
        self.place = f"on {self.server}"
        self.where = self.resume_where = f" --server {self.server}"

    def __enter__(self) -> "RemoteBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.client.close()

    # -- reading ----------------------------------------------------------------------------
    def list(self) -> list[dict]:
        return self.client.list()

    def detail(self, search_id: str) -> dict:
        return self.client.get(search_id)

    def recipes_json(self, search_id: str) -> tuple[str, Optional[dict]]:
        text = self.client.recipes_json(search_id)
        try:
            extra = json.loads(text).get("mbp_search", {})
            facts = {"recipes": len(extra.get("recipe_details", {})), "status": extra.get("status")}
        except (ValueError, AttributeError):
            facts = None
        return (text if text.endswith("\n") else text + "\n"), facts

    def plot_png(self, search_id: str) -> bytes:
        return self.client.plot_png(search_id)

    def coreml(self, search_id: str) -> dict:
        return self.client.coreml(search_id)

    def fetch_package(self, search_id: str, key: str, fh, kind: str = "mlpackage") -> None:
        self.client.download_package(search_id, key, fh, kind)

    def queue_coreml(self, search_id: str, apply: str, coreml_node: str) -> dict:
        return self.client.queue_coreml(search_id, apply, coreml_node)

    # -- changing ---------------------------------------------------------------------------
    def cancel(self, search_id: str) -> dict:
        return self.client.cancel(search_id)

    def submit(self, request: dict) -> dict:
        if request.get("images_dir") is not None:  # --images DIR: read here and sent (a server path is refused)
            from pathlib import Path

            from search.cli.console import CliError
            from search.service.uploaded_images import ImageRefused, encode_folder

            try:
                images = encode_folder(Path(request["images_dir"]).expanduser())
            except ImageRefused as exc:
                raise CliError(str(exc)) from None
            request = {**{k: v for k, v in request.items() if k != "images_dir"}, "images": images}
        try:
            return self.client.submit(request)
        except RemoteError as exc:
            existing = exc.body.get("existing")
            if exc.status == 409 and existing:
                raise duplicate_error(str(exc).split(" (HTTP")[0], existing, self.where) from None
            raise

    def resume(self, search_id: str, workers: Optional[int] = None) -> dict:
        return self.client.resume(search_id, workers)

    def target_recipe(self, search_id: str, *, bits, size_mb, psnr, workers: int, ray_address: Optional[str],
                      refine_evals: Optional[int] = None) -> dict:
        """Build and measure the optimal recipe for one target on the service (it answers once measured)."""
        import httpx

        from search.service.client import _segment

        body = {"bits": bits, "size_mb": size_mb, "psnr": psnr, "workers": workers, "refine_evals": refine_evals}
        return self.client._json("POST", f"/searches/{_segment(search_id)}/recipe",
                                 json={k: v for k, v in body.items() if v is not None},
                                 timeout=httpx.Timeout(TARGET_TIMEOUT_S, connect=10.0))

    def run(self, search_id: str, workers: Optional[int] = None, ray_address: Optional[str] = None):
        """Follow the search on the service until it ends (its driver runs there)."""
        info = self._follow(search_id)
        result = (info.get("progress") or {}).get("result") or {}
        return info, {**result, "status": info["status"], "error": info.get("error")}

    def _follow(self, sid: str, poll_s: float = 1.0) -> dict:
        """Poll the service and draw the driver's bars with the local RichReporter until the search
        ends; returns its last detail. Ctrl-C stops watching, not the search."""
        from search.driver.progress import console_reporter
        from storage.records import ACTIVE

        run, seen, last_message = None, {}, 0
        unreachable_since = None
        try:
            with console_reporter(err) as reporter:
                while True:
                    try:
                        info = self.client.get(sid)
                        unreachable_since = None
                    except RemoteError as exc:
                        # The service restarting (it resumes its searches) is not the end of the search.
                        if exc.status is not None:
                            raise
                        unreachable_since = unreachable_since or time.monotonic()
                        if time.monotonic() - unreachable_since > FOLLOW_RECONNECT_S:
                            raise
                        time.sleep(2)
                        continue
                    progress = info.get("progress") or {}
                    if progress.get("run") != run:
                        run, seen, last_message = progress.get("run"), {}, 0
                    for seq, text in progress.get("messages", []):
                        if seq > last_message:
                            reporter.message(text)
                            last_message = seq
                    for i, entry in enumerate(progress.get("phases", [])):
                        key = (i, entry["phase"])
                        if key not in seen:
                            reporter.phase_start(entry["phase"], entry["total"])
                            seen[key] = 0
                        if entry["done"] > seen[key]:
                            reporter.advance(entry["phase"], entry["done"] - seen[key])
                            seen[key] = entry["done"]
                            if entry["done"] >= entry["total"]:
                                reporter.phase_end(entry["phase"])
                    if info["status"] not in ACTIVE and not info.get("running_here"):
                        return info
                    time.sleep(poll_s)
        except KeyboardInterrupt:
            err.print(f"[yellow]stopped watching:[/] search {sid} goes on at {self.server}; cancel it with "
                      f"`search cancel {sid}{self.where}`", highlight=False)
            raise typer.Exit(130) from None
