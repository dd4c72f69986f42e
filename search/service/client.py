"""A small client of the search service (`search serve`), used by the CLI's remote mode.

Every failure becomes a `RemoteError` with one line for the user: the service unreachable,
a missing or wrong token (401), an unknown search (404), a refused request (409, 403) or bad
input (422, with the server's reason).
"""
from __future__ import annotations

from urllib.parse import urlsplit

import httpx

RESUME_TIMEOUT_S = 1800.0  # resuming a prepared search loads its UNet once to check the fingerprint
TIMEOUT_S = 120.0


class RemoteError(Exception):
    """A request to the service failed; the message is one line, `code` the CLI exit status."""

    def __init__(self, message: str, code: int = 2, status: int | None = None, body: dict | None = None):
        super().__init__(message)
        self.code, self.status, self.body = code, status, body or {}


class Client:
    def __init__(self, server: str, token: str | None = None, *, timeout: float = TIMEOUT_S):
        server = (server or "").strip().rstrip("/")
        parts = urlsplit(server)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise RemoteError(f"--server must be an http(s) URL such as http://127.0.0.1:8765, got '{server}'")
        self.server, self.token = server, token or None
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self.http = httpx.Client(base_url=server, headers=headers, timeout=httpx.Timeout(timeout, connect=10.0),
                                 follow_redirects=False, trust_env=False)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- transport ----------------------------------------------------------------------------
    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            r = self.http.request(method, path, **kwargs)
        except httpx.ConnectError:
            raise RemoteError(f"cannot connect to the search service at {self.server}: is `search serve` running "
                              "there (and the port forwarded)?") from None
        except httpx.TimeoutException:
            raise RemoteError(f"the search service at {self.server} did not answer in time") from None
        except httpx.HTTPError as exc:
            raise RemoteError(f"request to {self.server} failed: {exc}") from None
        if r.status_code < 400:
            return r
        self._raise(r)

    def _raise(self, r: httpx.Response):
        try:
            body = r.json()
        except ValueError:
            body = {}
        detail = body.get("detail") if isinstance(body, dict) else None
        if not isinstance(detail, str) or not detail:
            detail = r.reason_phrase or f"HTTP {r.status_code}"
        detail = detail.strip().splitlines()[0]
        if r.status_code == 401:
            hint = "pass --token or set MBP_SEARCH_TOKEN" if not self.token else "the token is wrong"
            raise RemoteError(f"the search service at {self.server} refused the request (401 unauthorized): {hint}",
                              status=401, body=body)
        code = 1 if r.status_code == 409 else 2
        raise RemoteError(f"{detail} (HTTP {r.status_code} from {self.server})", code=code, status=r.status_code,
                          body=body if isinstance(body, dict) else {})

    def _json(self, method: str, path: str, **kwargs):
        r = self.request(method, path, **kwargs)
        try:
            return r.json()
        except ValueError:
            raise RemoteError(f"{self.server} answered {path} with something that is not JSON; is it a search "
                              "service?") from None

    # -- API ------------------------------------------------------------------------------------
    def health(self) -> dict:
        return self._json("GET", "/health")

    def submit(self, body: dict) -> dict:
        return self._json("POST", "/searches", json={k: v for k, v in body.items() if v is not None})

    def list(self) -> list[dict]:
        return self._json("GET", "/searches")

    def get(self, search_id: str) -> dict:
        return self._json("GET", f"/searches/{_segment(search_id)}")

    def resume(self, search_id: str, workers: int | None = None) -> dict:
        body = {"workers": workers} if workers is not None else None
        return self._json("POST", f"/searches/{_segment(search_id)}/resume", json=body,
                          timeout=httpx.Timeout(RESUME_TIMEOUT_S, connect=10.0))

    def cancel(self, search_id: str) -> dict:
        return self._json("POST", f"/searches/{_segment(search_id)}/cancel")

    def recipes_json(self, search_id: str) -> str:
        return self.request("GET", f"/searches/{_segment(search_id)}/recipes.json").text

    def plot_png(self, search_id: str) -> bytes:
        return self.request("GET", f"/searches/{_segment(search_id)}/plot.png").content

    def coreml(self, search_id: str) -> dict:
        return self._json("GET", f"/searches/{_segment(search_id)}/coreml")

    def queue_coreml(self, search_id: str, apply: str, coreml_node: str) -> dict:
        return self._json("POST", f"/searches/{_segment(search_id)}/coreml",
                          json={"apply": apply, "coreml_node": coreml_node})

    def here_job(self, search_id: str) -> dict:
        return self._json("GET", f"/searches/{_segment(search_id)}/coreml/recipes.json")

    def palette_bytes(self, search_id: str, layer: str, bits: str) -> bytes:
        return self.request("GET", f"/searches/{_segment(search_id)}/coreml/palette",
                            params={"layer": layer, "bits": bits}).content

    def post_validations(self, search_id: str, rows: list[dict]) -> dict:
        return self._json("POST", f"/searches/{_segment(search_id)}/coreml/validations", json=rows)

    def download_package(self, search_id: str, key: str, fh, kind: str = "mlpackage") -> None:
        """Append recipe ``key``'s zip (``kind`` mlpackage: its Core ML package; bundle: its
        Resources folder) to the open binary file ``fh`` in pieces, from its current size on (a
        Range request: an interrupted download resumes)."""
        if kind not in ("mlpackage", "bundle", "coreai"):  # coreai: a Core AI folder (issue 36)
            raise ValueError(f"unknown kind {kind!r}")
        start = fh.tell()
        headers = {"Range": f"bytes={start}-"} if start else {}
        path = f"/searches/{_segment(search_id)}/coreml/{_segment(key)}.{kind}.zip"
        try:
            with self.http.stream("GET", path, headers=headers) as r:
                if r.status_code == 416:  # already whole
                    return
                if r.status_code >= 400:
                    r.read()
                    self._raise(r)
                if start and r.status_code != 206:  # the server sent it all again
                    fh.seek(0)
                    fh.truncate()
                for piece in r.iter_bytes(8 * 2**20):
                    fh.write(piece)
        except httpx.HTTPError as exc:
            what = "package" if kind == "mlpackage" else "bundle"
            raise RemoteError(f"downloading the {what} of recipe {key} from {self.server} failed: {exc}") from None


def _segment(search_id: str) -> str:
    """One URL path segment: anything that is not a plain id is escaped (the server answers 404)."""
    from urllib.parse import quote

    return quote(str(search_id), safe="").replace(".", "%2E")


__all__ = ["Client", "RemoteError"]
