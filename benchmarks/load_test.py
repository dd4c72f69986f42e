"""Many clients: bounded load on a real `search serve` (loopback) while a search runs.

In one run, side by side: the same search first on an idle service, then again while, for
``--load-s`` seconds, ``--clients`` concurrent clients poll the list, the search's status, its
plot and its download (each waiting ``--pause`` s between requests) and a cycler runs up to
``--cycles`` submit / cancel / resume / cancel cycles of other searches. Reported: p50 / p99 latency per route, errors (a 5xx,
a refused connection, a timeout or a status the route should not answer), and the running
search's evaluations/s (stored measurements over the time between its first and last one, read
from the database) idle vs loaded.

    python benchmarks/load_test.py --clients 50 --cycles 20 --load-s 600 --out load.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.cli_helpers import cli_cmd, cli_env  # noqa: E402
from tests.search.test_service import kill_tree  # noqa: E402

SEARCH = {"model": "tiny-sdxl", "nbits": "2,8", "min_size": 16384, "num_recipes": 3, "workers": 2}
OTHER = {"model": "tiny-sdxl", "nbits": "4", "min_size": 16384, "num_recipes": 2, "workers": 1}
ROUTES = ("list", "status", "plot", "recipes")


def rate(db: Path, sid: str) -> tuple[int, float]:
    """(measurements, per second between the first and the last one stored): the evaluators'
    pace, without the model load before the first."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        rows = [r[0] for r in con.execute("SELECT created_at FROM measurements WHERE search_id = ? ORDER BY id",
                                          (sid,))]
    finally:
        con.close()
    times = [datetime.fromisoformat(str(t)) for t in rows]
    span = (times[-1] - times[0]).total_seconds() if len(times) > 1 else 0.0
    return len(times), (len(times) - 1) / span if span else 0.0


class Load:
    def __init__(self, url: str, token: str, sid: str, clients: int, pause: float, cycles: int, seed: int):
        self.url, self.headers, self.sid = url, {"Authorization": f"Bearer {token}"}, sid
        self.clients, self.pause, self.cycles, self.rng = clients, pause, cycles, random.Random(seed)
        self.latency: dict[str, list[float]] = {r: [] for r in (*ROUTES, "submit", "cancel", "resume")}
        self.errors: list[str] = []
        self.done_cycles = 0

    async def call(self, http: httpx.AsyncClient, route: str, method: str, path: str, ok: tuple[int, ...], **kw):
        t0 = time.perf_counter()
        try:
            r = await http.request(method, path, headers=self.headers, **kw)
        except httpx.HTTPError as exc:
            self.errors.append(f"{route}: {type(exc).__name__}")
            return None
        self.latency[route].append(time.perf_counter() - t0)
        if r.status_code not in ok:
            self.errors.append(f"{route}: HTTP {r.status_code} {r.text[:200]}")
        return r

    async def client(self, http: httpx.AsyncClient, stop: asyncio.Event, rng: random.Random) -> None:
        paths = {"list": "/searches", "status": f"/searches/{self.sid}", "plot": f"/searches/{self.sid}/plot.png",
                 "recipes": f"/searches/{self.sid}/recipes.json"}
        await asyncio.sleep(rng.uniform(0, self.pause))
        while not stop.is_set():
            route = rng.choice(ROUTES)
            await self.call(http, route, "GET", paths[route], (200,))
            await asyncio.sleep(self.pause)

    async def wait_status(self, http, sid: str, wanted: tuple[str, ...], timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = await self.call(http, "status", "GET", f"/searches/{sid}", (200,))
            if r is not None and r.json()["status"] in wanted:
                return
            await asyncio.sleep(0.5)
        self.errors.append(f"cycle: search {sid} never reached {wanted}")

    async def cycler(self, http: httpx.AsyncClient) -> None:
        """Submit another search, cancel it, resume it, cancel it again: ``cycles`` times."""
        for i in range(self.cycles):
            r = await self.call(http, "submit", "POST", "/searches", (201,), json={**OTHER, "seed": 1000 + i})
            if r is None or r.status_code != 201:
                continue
            sid = r.json()["id"]
            for step in range(2):
                if step:
                    await self.call(http, "resume", "POST", f"/searches/{sid}/resume", (202,))
                # cancelling a search that ended on its own in the meantime is a documented 409
                await self.call(http, "cancel", "POST", f"/searches/{sid}/cancel", (202, 409))
                await self.wait_status(http, sid, ("cancelled", "completed", "failed"))
            self.done_cycles += 1

    async def run(self, finished, load_s: float) -> float:
        limits = httpx.Limits(max_connections=self.clients + 4)
        async with httpx.AsyncClient(base_url=self.url, timeout=120, limits=limits, trust_env=False) as http:
            stop = asyncio.Event()
            tasks = [asyncio.create_task(self.client(http, stop, random.Random(self.rng.random())))
                     for _ in range(self.clients)]
            cycler = asyncio.create_task(self.cycler(http))
            t0 = time.monotonic()
            while time.monotonic() - t0 < load_s and not await asyncio.to_thread(finished):
                await asyncio.sleep(1)
            stop.set()
            cycler.cancel()
            await asyncio.gather(*tasks, cycler, return_exceptions=True)
            return time.monotonic() - t0


def pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))] * 1000 if values else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--pause", type=float, default=1.0, help="seconds each client waits between requests")
    ap.add_argument("--cycles", type=int, default=20)
    ap.add_argument("--load-s", type=float, default=600.0, help="how long the load lasts (the idle run gets as long)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="load-test-"))
    db, token = work / "s.db", secrets.token_urlsafe(24)
    env = cli_env(Path(os.environ.get("MBP_SEARCH_CACHE") or work / "cache"), RAY_USAGE_STATS_ENABLED="0",
                  RAY_TMPDIR=tempfile.mkdtemp(prefix="mbplt", dir="/tmp"))
    for name in ("MBP_SEARCH_SERVER", "MBP_SEARCH_TOKEN", "RAY_ADDRESS"):
        env.pop(name, None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url, headers = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {token}"}
    server = subprocess.Popen(cli_cmd("serve", "--port", port, "--db", db, "--token", token, "--log-level", "warning"),
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=open(work / "serve.log", "w"),
                              start_new_session=True)
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        http = httpx.Client(base_url=url, headers=headers, timeout=120, trust_env=False)

        def submit(seed: int) -> str:
            r = http.post("/searches", json={**SEARCH, "seed": seed})
            assert r.status_code == 201, r.text
            return r.json()["id"]

        def completed(sid: str) -> bool:
            """It ended (completed, or anything else: an error of the run)."""
            status = http.get(f"/searches/{sid}").json()["status"]
            if status not in ("pending", "running", "completed"):
                raise SystemExit(f"search {sid} is {status}, not running: see {work / 'serve.log'}")
            return status == "completed"

        def window(sid: str) -> None:
            """Until the search has measured for ``load_s`` seconds (or completed)."""
            while not completed(sid) and not (rate_or_none(sid) and time.monotonic() - first[sid] >= args.load_s):
                time.sleep(2)

        first: dict[str, float] = {}

        def rate_or_none(sid: str):
            if sid not in first and rate(db, sid)[0] > 0:
                first[sid] = time.monotonic()
            return sid in first

        idle_sid = submit(1)
        window(idle_sid)
        idle = rate(db, idle_sid)
        http.post(f"/searches/{idle_sid}/cancel")
        print(f"idle: {idle[0]} measurements, {idle[1]:.3f} evaluations/s", flush=True)
        loaded_sid = submit(2)  # the same search (another noise seed: a new search, same work)
        while not rate_or_none(loaded_sid):
            time.sleep(1)
        load = Load(url, token, loaded_sid, args.clients, args.pause, args.cycles, args.seed)
        wall = asyncio.run(load.run(lambda: completed(loaded_sid), args.load_s))
        loaded = rate(db, loaded_sid)
        print(f"loaded: {loaded[0]} measurements, {loaded[1]:.3f} evaluations/s ({wall:.0f} s under load)")
    finally:
        server.terminate()
        try:
            server.wait(90)
        except subprocess.TimeoutExpired:
            kill_tree(server.pid)
    requests = {r: len(v) for r, v in load.latency.items()}
    figures = {
        "clients": args.clients, "pause_s": args.pause, "cycles_done": load.done_cycles, "errors": len(load.errors),
        "error_samples": load.errors[:10], "requests": requests, "load_s": round(wall),
        "latency_ms": {r: {"p50": round(pct(v, 0.5), 1), "p99": round(pct(v, 0.99), 1)}
                       for r, v in load.latency.items() if v},
        "evals_per_s": {"idle": round(idle[1], 4), "loaded": round(loaded[1], 4),
                        "ratio": round(loaded[1] / idle[1], 3)},
        "requests_per_s": round(sum(requests.values()) / wall, 1),
    }
    print(json.dumps(figures, indent=1))
    if args.out:
        args.out.write_text(json.dumps(figures, indent=1))
    return 0 if not load.errors else 1


if __name__ == "__main__":
    sys.exit(main())
