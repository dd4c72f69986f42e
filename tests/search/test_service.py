"""The search service end to end: a real `search serve` process on 127.0.0.1 (port 0: the kernel
picks a free port and the service reports it; bearer token, its own local Ray), real HTTP
requests, and the CLI's remote mode against it.

Also holds the process helpers (ports, process trees, the server wrapper) that
test_multinode.py reuses.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from tests.cli_helpers import ROOT, cli_cmd, cli_env, error_line, floor_probes, invoke_with_env, run_cli
from tests.reference.json_checks import check_apple_recipes_from_json

TINY = dict(model="tiny-sdxl", nbits="8", min_size=16384)        # 47 candidates
TINY_ARGS = ["--model", "tiny-sdxl", "--nbits", "8", "--min-size", "16384"]
ACTIVE = ("pending", "running", "cancelling")
SEARCH_TIMEOUT_S = 300
SLOW_LOAD_S = 8  # the service's searches take this much longer to load their UNet (MBP_SEARCH_SLOW_LOAD_S)


# -- helpers (also used by test_multinode.py) -----------------------------------------------
def free_port() -> int:
    """A port free a moment ago. Only for programs that cannot bind port 0 and say what they got
    (Ray's agents): whoever uses it must retry on a clash. `search serve` binds port 0."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LISTENING = re.compile(r"search service on http://\S+:(\d+) ")  # what `search serve` prints once bound


def descendants(pid: int) -> list[int]:
    """All processes below `pid` (Linux /proc), children first found breadth-first."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> list[int]:
    """Signal `pid` and every process below it (collected before anything dies)."""
    pids = [pid, *descendants(pid)]
    for p in pids:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass
    return pids


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def ray_env(model_cache: Path, ray_token: str, tmpdir: str | None = None, **extra: str) -> dict:
    """Environment of every process of a test cluster: loopback only (Ray otherwise swaps 127.0.0.1
    for the machine's outward address), token auth with a token of this test, no usage stats."""
    env = cli_env(model_cache, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token",
                  RAY_AUTH_TOKEN=ray_token, RAY_USAGE_STATS_ENABLED="0", **extra)
    for name in ("MBP_SEARCH_SERVER", "MBP_SEARCH_TOKEN", "RAY_ADDRESS", "MBP_SEARCH_FAIL_KEYS"):
        env.pop(name, None)
    if tmpdir:
        env["RAY_TMPDIR"] = tmpdir
    return env


class ServiceProcess:
    """`search serve` in its own session; restartable; always cleaned up by stop(). It binds port 0
    (no port picked here that another process could take first): ``port`` and ``url`` are what it
    reported, set by start() (a restart may get another port)."""

    def __init__(self, db: Path, env: dict, token: str, log: Path, *extra: str):
        self.db, self.env, self.token, self.log, self.extra = db, env, token, log, extra
        self.port: int | None = None
        self.url = ""
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180) -> "ServiceProcess":
        self.log.touch()
        offset = self.log.stat().st_size  # the log is appended to across restarts
        self.proc = subprocess.Popen(
            cli_cmd("serve", "--port", "0", "--db", str(self.db), "--token", self.token, *self.extra),
            cwd=ROOT, env=self.env, stdout=open(self.log, "a"), stderr=subprocess.STDOUT, start_new_session=True)
        self.port, self.url = None, ""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"search serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self.port is None and (m := LISTENING.search(self.log.read_text(errors="replace")[offset:])):
                self.port = int(m.group(1))
                self.url = f"http://127.0.0.1:{self.port}"
            try:
                if self.port is not None and httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        pytest.fail(f"search serve did not answer within {timeout} s:\n{self.log_tail()}")

    def client(self, token: str | None = "default", timeout: float = 300) -> httpx.Client:
        token = self.token if token == "default" else token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout, trust_env=False)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 90) -> int | None:
        """Graceful stop (drivers interrupted cleanly), then SIGKILL of whatever is left."""
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        tree = [proc.pid, *descendants(proc.pid)]
        if proc.poll() is None:
            os.kill(proc.pid, sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        for p in tree:
            if p != proc.pid and alive(p):
                kill_tree(p)
        if proc.poll() is None:
            kill_tree(proc.pid)
            proc.wait(30)
        return proc.returncode

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text()[-n:]
        except OSError:
            return ""


def wait_for(fetch, condition, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fetch()
        if condition(last):
            return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout} s waiting for {what}; last: {json.dumps(last, default=str)[:2000]}")


def raw_get(url: str, path: str, token: str) -> tuple[int, bytes]:
    """A request whose path goes on the wire exactly as written (no client-side normalization)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.putrequest("GET", path, skip_accept_encoding=True)
        conn.putheader("Authorization", f"Bearer {token}")
        conn.endheaders()
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


# -- fixtures ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory, model_cache):
    base = tmp_path_factory.mktemp("service")
    models = base / "models"
    models.mkdir()
    raytmp = tempfile.mkdtemp(prefix="mbpsv", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = ray_env(model_cache, secrets.token_hex(16), tmpdir=raytmp, MBP_SEARCH_SLOW_LOAD_S=str(SLOW_LOAD_S))
    srv = ServiceProcess(base / "searches.db", env, secrets.token_urlsafe(24), base / "serve.log",
                         "--allow-model-dir", str(models))
    srv.base, srv.models = base, models
    try:
        yield srv.start()
    finally:
        srv.stop()
        shutil.rmtree(raytmp, ignore_errors=True)


def remote(server, *args, token: str | None = "default", timeout: float = SEARCH_TIMEOUT_S, model_cache=None):
    env = {} if token is None else {"MBP_SEARCH_TOKEN": server.token if token == "default" else token}
    proc = subprocess.run(cli_cmd(*args, "--server", server.url), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**{k: v for k, v in server.env.items() if k != "MBP_SEARCH_TOKEN"},
                                                **env})
    return proc


def remote_here(server, *args, token: str | None = "default") -> subprocess.CompletedProcess:
    """`remote` run in this process (typer's CliRunner, the same environment): for what the remote
    CLI says and its exit code, not its process (a subprocess costs ~2 s of imports per call)."""
    env = {k: v for k, v in server.env.items() if k != "MBP_SEARCH_TOKEN"}
    if token is not None:
        env["MBP_SEARCH_TOKEN"] = server.token if token == "default" else token
    return invoke_with_env(cli_cmd(*args, "--server", server.url), env)


def stored(db: Path, sid: str) -> dict:
    """What the SQLite file holds for one search: measurements per phase, baselines, measured recipes."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        one = lambda sql: con.execute(sql, (sid,)).fetchall()  # noqa: E731
        return {"measurements": dict(one("SELECT phase, COUNT(*) FROM measurements WHERE search_id = ? "
                                         "GROUP BY phase")),
                "baselines": one("SELECT COUNT(*) FROM baselines WHERE search_id = ?")[0][0],
                "recipes": one("SELECT COUNT(*) FROM recipes WHERE search_id = ? AND psnr IS NOT NULL")[0][0]}
    finally:
        con.close()


def search_row(db: Path, sid: str) -> dict:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        con.row_factory = sqlite3.Row
        return dict(con.execute("SELECT * FROM searches WHERE id = ?", (sid,)).fetchone())
    finally:
        con.close()


# -- quick checks, no server needed ----------------------------------------------------------
def test_serve_refuses_public_host_without_token(tmp_path, model_cache):
    env = {"MBP_SEARCH_TOKEN": ""}
    proc = run_cli("serve", "--host", "0.0.0.0", "--db", tmp_path / "s.db", model_cache=model_cache, **env)
    assert proc.returncode == 2 and "token" in error_line(proc)
    proc = run_cli("serve", "--host", "0.0.0.0", "--token", "short", "--db", tmp_path / "s.db",
                   model_cache=model_cache)
    assert proc.returncode == 2 and "too short" in error_line(proc)
    assert not (tmp_path / "s.db").exists()


def test_remote_mode_errors_without_a_server(tmp_path, model_cache):
    with socket.socket() as held:  # bound, never listening, held for the test: connections are refused
        held.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{held.getsockname()[1]}"
        for args in (["list"], ["status", "abc"], ["submit", *TINY_ARGS], ["download", "abc", "-o", "-"]):
            proc = run_cli(*args, "--server", url, model_cache=model_cache)
            assert proc.returncode == 2 and "cannot connect to the search service" in error_line(proc), args
        proc = run_cli("list", "--server", "ftp://example", model_cache=model_cache)
        assert proc.returncode == 2 and "http(s) URL" in error_line(proc)
        proc = run_cli("list", "--server", url, "--db", tmp_path / "x.db", model_cache=model_cache)
        assert proc.returncode == 2 and "--db only apply to local searches" in error_line(proc)
        proc = run_cli("submit", *TINY_ARGS, "--wait", "--db", tmp_path / "x.db", model_cache=model_cache)
        assert proc.returncode == 2 and "--wait is for --server" in error_line(proc)
        assert not (tmp_path / "x.db").exists()


# -- against the real server ---------------------------------------------------------------
@pytest.mark.slow
def test_token_required_everywhere_but_health(server):
    anon, wrong, good = server.client(token=None), server.client(token="x" * 32), server.client()
    assert anon.get("/health").json()["status"] == "ok"
    for path in ("/searches", "/searches/abc123", "/searches/abc123/recipes.json", "/searches/abc123/plot.png",
                 "/openapi.json", "/cluster", "/no/such/route", "/dashboard/searches",
                 "/dashboard/searches/abc123", "/searches/abc123/measurements"):
        for c in (anon, wrong):
            r = c.get(path)
            assert r.status_code == 401, (path, r.status_code)
            assert r.headers["www-authenticate"] == "Bearer" and "token" in r.json()["detail"]
    # The pages hold no data (the page sends the token itself); their assets are served, not fetched from a CDN.
    for path in ("/", "/docs", "/static/app.js", "/static/vendor/swagger-ui/swagger-ui-bundle.js"):
        r = anon.get(path)
        assert r.status_code == 200 and b"cdn" not in r.content.lower(), path
    assert anon.get("/redoc").status_code == 401 and anon.get("/static/nothing.js").status_code == 404
    assert anon.post("/searches", json=TINY).status_code == 401
    assert anon.post("/searches/abc123/cancel").status_code == 401
    assert anon.post("/searches/abc123/resume").status_code == 401
    schema = good.get("/openapi.json").json()
    assert {"/searches", "/searches/{search_id}", "/searches/{search_id}/resume", "/searches/{search_id}/cancel",
            "/searches/{search_id}/recipes.json", "/searches/{search_id}/plot.png"} <= set(schema["paths"])
    assert "HTTPBearer" in schema["components"]["securitySchemes"]
    # The CLI reports a missing or wrong token in one line.
    proc = remote_here(server, "list", token=None)
    assert proc.returncode == 2 and "401" in error_line(proc) and "--token" in error_line(proc)
    proc = remote_here(server, "list", token="y" * 32)
    assert proc.returncode == 2 and "token is wrong" in error_line(proc)


@pytest.mark.slow
def test_unknown_ids_and_path_traversal(server):
    c = server.client()
    for sid in ("deadbeef0000", "0"):
        for suffix in ("", "/recipes.json", "/plot.png"):
            r = c.get(f"/searches/{sid}{suffix}")
            assert r.status_code == 404 and r.json()["detail"] == f"no search '{sid}'", (sid, suffix)
        assert c.post(f"/searches/{sid}/cancel").status_code == 404
        assert c.post(f"/searches/{sid}/resume").status_code == 404
    attempts = [
        "/searches/..%2F..%2Fetc%2Fpasswd/recipes.json",
        "/searches/..%2F..%2F..%2F..%2Fetc%2Fpasswd",
        "/searches/../../etc/passwd",
        "/searches/%2e%2e/plot.png",
        "/searches/%2e%2e%2fsearches.db/plot.png",
        "/searches/abc.def/recipes.json",
        "/searches/abc%2Fdef/plot.png",
        "/searches/ABCDEF/recipes.json",
        "/searches/abc%00def/plot.png",
        "/searches/abc%5c..%5c..%5cetc%5cpasswd/plot.png",
        "/searches/" + "a" * 33 + "/plot.png",
    ]
    for path in attempts:
        status, body = raw_get(server.url, path, server.token)
        assert status == 404, (path, status, body[:200])
        assert b"root:" not in body and b"SQLite format" not in body
    # The client escapes ids too: whatever the user types stays one path segment.
    for bad in ("../../etc/passwd", "..", "a/b", "a.b"):
        proc = remote_here(server, "download", bad, "-o", "-")
        assert proc.returncode == 2 and "HTTP 404" in error_line(proc), bad
    assert not any(p.suffix == ".png" for p in server.base.rglob("*") if "plots" not in p.parts)


@pytest.mark.slow
def test_invalid_requests_are_422_with_the_reason(server):
    c = server.client()
    cases = [
        ({**TINY, "nbits": "3"}, "unsupported bit depth(s) 3"),
        ({**TINY, "nbits": "4,x"}, "'x' is not an integer"),
        ({**TINY, "num_recipes": "many"}, "num_recipes: Input should be a valid integer"),
        ({**TINY, "num_recipes": 0}, "--num-recipes"),
        ({**TINY, "resolution": 60}, "multiple of 8"),
        ({**TINY, "workers": 0}, "workers: Input should be greater than or equal to 1"),
        ({**TINY, "precision": "double"}, "precision"),
        ({**TINY, "colour": "red"}, "colour: Extra inputs are not permitted"),
        ({**TINY, "prompts": []}, "prompts: List should have at least 1 item"),
        ({"nbits": "8"}, "model: Field required"),
        ({**TINY, "model": "not a repo id!"}, "unknown model 'not a repo id!'"),
        ({**TINY, "model": "./relative/dir"}, "must be an absolute path on the server"),
    ]
    for body, reason in cases:
        r = c.post("/searches", json=body)
        assert r.status_code == 422, (body, r.status_code, r.text)
        assert reason in r.json()["detail"], (reason, r.json())
    r = c.post("/searches", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "JSON" in r.json()["detail"]
    # The CLI shows the server's reason in one line.
    proc = remote_here(server, "submit", "--model", "not a repo id!")
    assert proc.returncode == 2 and "unknown model 'not a repo id!'" in error_line(proc)
    rows = c.get("/searches").json()
    assert rows == [], "a rejected request must not create a search"


@pytest.mark.slow
def test_remote_model_paths_must_lie_under_an_allowed_dir(server, tmp_path):
    c = server.client()
    outside = tmp_path / "pipeline"
    outside.mkdir()
    (outside / "model_index.json").write_text("{}")
    link = server.models / "sneaky"
    link.symlink_to(outside, target_is_directory=True)
    inside = server.models / "not-a-pipeline"
    inside.mkdir()
    for model in (str(outside), "/etc", str(link), str(server.models / ".." / ".." / "etc"), "/"):
        r = c.post("/searches", json={**TINY, "model": model})
        assert r.status_code == 403, (model, r.status_code, r.text)
        assert "outside the server's allowed model directories" in r.json()["detail"]
    r = c.post("/searches", json={**TINY, "model": str(inside)})
    assert r.status_code == 422 and "model_index.json" in r.json()["detail"]
    r = c.post("/searches", json={**TINY, "model": str(server.models / "missing")})
    assert r.status_code == 422 and "does not exist" in r.json()["detail"]
    assert c.get("/searches").json() == []


@pytest.mark.slow
def test_submit_returns_before_the_model_is_loaded(server):
    """The service's Ray workers load every UNet SLOW_LOAD_S seconds late (test hook): the submit
    still answers at once, the search shows its preparing phase (bytes fetched) in `status` and
    `list`, a duplicate submit while it prepares is recognised, and it then completes."""
    c = server.client()
    body = {**TINY, "num_recipes": 5}
    t0 = time.monotonic()
    r = c.post("/searches", json=body)
    submit_s = time.monotonic() - t0
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    assert submit_s < SLOW_LOAD_S / 2, f"submit took {submit_s:.2f} s: it waited for the model"
    assert r.json()["preparing"] is not None and r.json()["phase"] == "preparing"
    d = c.get(f"/searches/{sid}").json()
    assert d["phase"] == "preparing" and d["fingerprint"] == "" and d["candidates"] == 0, d
    assert d["preparing"]["done_bytes"] <= d["preparing"]["total_bytes"] or not d["preparing"]["total_bytes"]
    r = c.post("/searches", json=body)  # the same search, still preparing
    assert r.status_code == 409 and r.json()["existing"] == sid, r.text
    listed = remote_here(server, "list")
    row = next(line for line in listed.stdout.splitlines() if sid in line)
    assert "preparing" in row and ("%" in row or " MB" in row), listed.stdout  # fetched so far
    d = wait_for(lambda: c.get(f"/searches/{sid}").json(), lambda d: d["status"] not in ACTIVE, SEARCH_TIMEOUT_S,
                 "the search to finish", interval=1)
    assert d["status"] == "completed" and d["candidates"] == 47 and len(d["fingerprint"]) == 64, d
    assert d["preparing"] is None and d["measurements"] == {"isolated": 47, "cumulative": 47, "floor": floor_probes(47)}
    print(f"\nsubmit answered in {submit_s * 1000:.0f} ms with a {SLOW_LOAD_S} s model load; the list row "
          f"while preparing: {' '.join(row.split())}")


def test_a_failed_preparation_fails_the_search_with_one_line(server):
    """A Hub model that is not cached, with HF_HUB_OFFLINE=1: accepted at once, then the driver's
    preparation fails it with the usual message."""
    c = server.client()
    r = c.post("/searches", json={**TINY, "model": "nobody-xyz/not-cached-model"})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    d = wait_for(lambda: c.get(f"/searches/{sid}").json(), lambda d: d["status"] not in ACTIVE, 120,
                 "the preparation to fail", interval=0.5)
    assert d["status"] == "failed" and "not in the local Hugging Face cache" in d["error"], d
    assert "\n" not in d["error"]
    proc = remote_here(server, "status", sid)
    assert "not in the local Hugging Face cache" in proc.stdout, proc.stdout


def test_cli_submit_wait_then_download(server, tmp_path):
    proc = remote(server, "submit", *TINY_ARGS, "--num-recipes", "3", "--wait")
    assert proc.returncode == 0, proc.stderr[-3000:]
    sid = proc.stdout.splitlines()[0].split()[1]
    for label in ("fetch model weights (MB)", "fit palettes (k-means)", "isolated impact + baselines", "cumulative curves", "measure recipes",
                  f"search {sid} completed", "evaluations this run"):
        assert label in proc.stderr, label
    assert "recipes of search" in proc.stdout and "--server" in proc.stdout

    c = server.client()
    info = c.get(f"/searches/{sid}").json()
    assert info["status"] == "completed" and info["phase"] == "done"
    n = info["candidates"]
    assert n == 47 and info["measurements"] == {"isolated": n, "cumulative": n, "floor": floor_probes(n)}
    # Apple's thresholds on bit-exact CPU arithmetic: the top ones give the same all-float16
    # recipe, stored once; how many distinct recipes 3 thresholds give is re-derived below.
    k = len(info["recipes"])
    assert 2 <= k <= 3 and info["counts"]["recipes"] == {"done": k, "total": k}
    assert [p["phase"] for p in info["progress"]["phases"]] == ["preparing", "palettes", "isolated", "cumulative",
                                                                 "recipes"]
    assert all(p["done"] == p["total"] for p in info["progress"]["phases"])
    assert sid in [row["id"] for row in c.get("/searches").json()]

    r = c.get(f"/searches/{sid}/recipes.json")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    report = r.json()
    assert {"model_version", "baselines", "recipes", "single_layer", "cumulative", "mbp_search"} <= set(report)
    assert report["mbp_search"]["search_id"] == sid and len(report["recipes"]) == k
    assert check_apple_recipes_from_json(report) == k  # re-derived from the JSON alone
    png = c.get(f"/searches/{sid}/plot.png")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.content.startswith(b"\x89PNG\r\n\x1a\n") and len(png.content) > 10_000
    data_dir = server.db.with_name(server.db.name + ".service")
    assert (data_dir / "plots" / f"{sid}.png").is_file()

    # The CLI's remote mode: list, status, download, plot, cancel of a finished search.
    proc = remote_here(server, "list")
    assert proc.returncode == 0 and sid in proc.stdout and "completed" in proc.stdout
    proc = remote_here(server, "list", "--json")
    assert sid in [row["id"] for row in json.loads(proc.stdout)]
    proc = remote_here(server, "status", sid)
    assert proc.returncode == 0 and "status completed" in proc.stdout and "isolated 47/47" in proc.stdout
    out = tmp_path / "recipes.json"
    proc = remote_here(server, "download", sid, "-o", str(out))
    assert proc.returncode == 0 and json.loads(out.read_text()) == report
    proc = remote_here(server, "download", sid[:6], "-o", "-")
    assert proc.returncode == 0 and json.loads(proc.stdout) == report
    plot = tmp_path / "psnr.png"
    proc = remote_here(server, "plot", sid, "-o", str(plot))
    assert proc.returncode == 0 and plot.read_bytes().startswith(b"\x89PNG")
    proc = remote_here(server, "status", sid, "--wait")
    assert proc.returncode == 0 and f"search {sid} completed" in proc.stderr and "recipes of search" in proc.stdout
    proc = remote_here(server, "cancel", sid)
    assert proc.returncode == 1 and "is not running (status completed)" in error_line(proc)
    assert c.post(f"/searches/{sid}/resume").status_code == 409


@pytest.mark.slow
def test_apply_without_a_coreml_node_is_refused_at_once(server):
    """`--apply` on a cluster with no node offering the ``coreml`` resource: one line within
    seconds, over HTTP and through the remote CLI, and nothing stored; the Core ML routes need the
    token and answer unknown searches with 404 and one line."""
    c = server.client()
    before = len(c.get("/searches").json())
    t0 = time.monotonic()
    r = c.post("/searches", json={**TINY, "num_recipes": 2, "apply": "all"})
    took = time.monotonic() - t0
    assert r.status_code == 409 and "'coreml' resource" in r.json()["detail"], r.text
    assert "\n" not in r.json()["detail"] and took < 10, took
    proc = remote_here(server, "submit", *TINY_ARGS, "--apply", "all")
    assert proc.returncode == 1 and "'coreml' resource" in error_line(proc), proc.stderr
    r = c.post("/searches", json={**TINY, "apply": " , "})
    assert r.status_code == 422 and "--apply" in r.json()["detail"], r.text
    assert len(c.get("/searches").json()) == before
    for method, path in (("POST", "/searches/ffffffff/coreml"), ("GET", "/searches/ffffffff/coreml"),
                         ("GET", "/searches/ffffffff/coreml/k.mlpackage.zip")):
        r = c.request(method, path)
        assert r.status_code == 404 and r.json()["detail"] == "no search 'ffffffff'", r.text
        assert server.client(token=None).request(method, path).status_code == 401


def test_cancel_resume_and_restart_resume(server):
    """One search through everything: HTTP submit, cancel, resume, the service stopped mid-run
    (SIGTERM: drivers interrupted cleanly), restarted (resumes it by itself), completion."""
    c = server.client()
    body = {**TINY, "nbits": "4,8", "num_recipes": 4,  # two depths: the cancel lands well before the end
            "reuse": False}  # counts below are this search's own runs, not copies of the earlier 8-bit searches
    r = c.post("/searches", json=body)
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    assert r.json()["created"] is True and r.json()["status"] == "pending"
    get = lambda: c.get(f"/searches/{sid}").json()  # noqa: E731

    wait_for(get, lambda d: d["counts"]["palettes"]["done"] >= 8, SEARCH_TIMEOUT_S, "palettes to be fitted")
    proc = remote_here(server, "cancel", sid[:8])
    assert proc.returncode == 0 and f"cancel requested for search {sid}" in proc.stderr, proc.stderr
    d = wait_for(get, lambda d: d["status"] not in ACTIVE, 60, "the driver to stop")
    assert d["status"] == "cancelled"
    palettes = d["counts"]["palettes"]["done"]
    measured = sum(d["measurements"].values())  # palettes fit in seconds: count progress by measurements
    assert 8 <= palettes <= 94, d
    # Cancelled means stopped: what the service shows is what the file holds, its counter counts
    # exactly the rows stored, and nothing more is stored afterwards.
    time.sleep(1)
    held, later = stored(server.db, sid), get()
    assert held["measurements"] == d["measurements"] == later["measurements"], (held, d, later)
    assert d["evaluations"] == later["evaluations"] == search_row(server.db, sid)["evaluations"] \
        == measured + held["baselines"] + held["recipes"], (held, d["evaluations"], later["evaluations"])
    assert c.post(f"/searches/{sid}/cancel").status_code == 409
    # An unfinished duplicate is refused, naming the existing search.
    r = c.post("/searches", json=body)
    assert r.status_code == 409 and r.json()["existing"] == sid

    proc = remote(server, "resume", sid, "--workers", "2")
    assert proc.returncode == 0 and proc.stdout.split() == ["search", sid], proc.stderr
    # what was stored before the cancel (isolated items and floor probes start while palettes are fitted)
    assert f"resuming: {sum(d['measurements'].values())} measurements already stored" in proc.stderr, proc.stderr
    assert get()["status"] in ACTIVE
    assert c.post(f"/searches/{sid}/resume").status_code == 409  # already running
    r = c.post("/searches", json={**body, "resume": True})  # submit --resume of a running search: the same one
    assert r.status_code == 200 and r.json()["id"] == sid and r.json()["created"] is False
    d = wait_for(get, lambda d: sum(d["measurements"].values()) >= measured + 3, SEARCH_TIMEOUT_S,
                 "measurements after the resume")

    before = server.log.stat().st_size
    server.stop()  # SIGTERM: the service interrupts its drivers and leaves
    shutdown = server.log.read_text(errors="replace")[before:]
    assert "Traceback" not in shutdown, shutdown[-3000:]  # (once an AttributeError on typer's missing click Abort)
    row = search_row(server.db, sid)
    assert row["status"] == "interrupted", row
    print(f"\ncancelled with {palettes} palettes and {measured} measurements stored; interrupted by the service's "
          f"shutdown with {row['evaluations']} evaluations stored, phase {row['phase']}")

    server.start()
    c = server.client()
    d = wait_for(lambda: c.get(f"/searches/{sid}").json(), lambda d: d["status"] not in ACTIVE, SEARCH_TIMEOUT_S,
                 "the resumed search to finish", interval=1)
    assert d["status"] == "completed", d
    assert d["measurements"] == {"isolated": 94, "cumulative": 94, "floor": floor_probes(47)}
    # Apple's thresholds on bit-exact CPU arithmetic: identical all-float16 recipes are stored once.
    k = len(d["recipes"])
    assert 2 <= k <= 4 and d["counts"]["recipes"] == {"done": k, "total": k}
    total = 94 + 2 + 94 + floor_probes(47) + k
    assert d["evaluations"] == total  # every result stored (once: the rows are unique by key)
    # Stored once is not computed once: the run after the restart had the evaluators compute
    # exactly what was missing (a recomputed result, stored as a no-op, would count here).
    assert d["progress"]["result"]["evaluations"] == total - row["evaluations"], (d["progress"]["result"], row)
    assert "resumed interrupted search" in server.log_tail(20000)
