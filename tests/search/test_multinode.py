"""Multi-node on one machine: a Ray head and an extra worker node started with `ray start` on
127.0.0.1 (their own ports, temp dir and auth token; one CPU each), the search service joined to
the head, searches submitted over HTTP. Measurements record the node that ran them and both
nodes run some; then, in a second search, the worker node is killed mid-search (every process
of it, by PID) and the search still completes on the head, every result stored exactly once.

**What the worker node can see.** Weights are fetched once per cluster: the driver (on the head)
ships the pipeline's files through Ray's object store and the worker node's evaluators copy them
into their own cache. To make that observable on one machine, the worker node gets its own
``MBP_SEARCH_CACHE`` and, where unprivileged user + mount namespaces exist (`unshare -Urm`), runs
in a mount namespace in which the head's model cache and the directory of head-only models
(``headonly/``) are covered by empty tmpfs mounts: the same paths exist there, empty. So a
worker-node evaluator that tried to read the model from its path would fail; it is the same
machine, user and network otherwise (the namespace maps our uid to root inside it). Without
`unshare` the head-only test is skipped (the other tests still ship, but could not tell).
"""
from __future__ import annotations

import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.cli_helpers import ROOT, floor_probes
from tests.search.test_service import (ACTIVE, SEARCH_TIMEOUT_S, TINY, ServiceProcess, alive, free_port, kill_tree,
                                       ray_env, wait_for)

pytestmark = pytest.mark.slow

HEAD_CPUS, WORKER_CPUS = 1, 1  # one evaluator per node
# `ray start` swaps 127.0.0.1 for the machine's outward address unless Ray is told it is a
# single-machine cluster (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0), and with that flag it refuses to
# start a *worker* node. The worker node therefore runs Ray's own `ray start` entry point with
# two attributes patched: the multi-node check passes and 127.0.0.1 stays 127.0.0.1.
WORKER_START = ("import sys, ray._private.ray_constants as c, ray._private.services as s; "
                "c.ENABLE_RAY_CLUSTER = True; s.resolve_ip_for_localhost = lambda host: host; "
                "from ray.scripts.scripts import main; sys.argv[0] = 'ray'; main()")


class RayNode:
    """One `ray start --block` process tree in its own session; stop() kills all of it by PID."""

    def __init__(self, name: str, argv: list[str], env: dict, log: Path):
        self.name, self.log = name, log
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def kill(self) -> list[int]:
        pids = kill_tree(self.proc.pid, signal.SIGKILL)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
        return pids

    def check(self) -> None:
        if self.proc.poll() is not None:
            pytest.fail(f"ray node {self.name} exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")


def node_args() -> list[str]:
    return ["--node-ip-address", "127.0.0.1", "--dashboard-agent-listen-port", str(free_port()),
            "--min-worker-port", "0", "--max-worker-port", "0", "--object-store-memory", str(150 * 2**20),
            "--disable-usage-stats", "--block"]


def wait_port(port: int, node: RayNode, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        node.check()
        with socket.socket() as s:
            s.settimeout(1)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    pytest.fail(f"the Ray head did not open port {port} within {timeout} s:\n{node.log.read_text()[-3000:]}")


def can_hide_paths() -> bool:
    """Unprivileged user + mount namespaces, with tmpfs mounts inside them."""
    probe = subprocess.run(["unshare", "-Urm", "sh", "-c", "mount -t tmpfs none /mnt && echo ok"],
                           capture_output=True, text=True) if shutil.which("unshare") else None
    return probe is not None and probe.returncode == 0 and probe.stdout.strip() == "ok"


def hidden(argv: list[str], paths: list[Path]) -> list[str]:
    """``argv`` in a new user + mount namespace where each of ``paths`` is an empty tmpfs."""
    mounts = " && ".join(f"mount -t tmpfs none '{p}'" for p in paths)
    return ["unshare", "-Urm", "sh", "-c", f'{mounts} && exec "$@"', "hidden", *argv]


@pytest.fixture(scope="module")
def cluster(model_cache):
    from workers.models import resolve_model

    tmp = Path(tempfile.mkdtemp(prefix="mbpmn", dir="/tmp"))  # short: Ray's socket paths have a length limit
    headonly, worker_cache = tmp / "headonly", tmp / "worker-cache"
    worker_cache.mkdir()
    shutil.copytree(resolve_model("tiny-sdxl", model_cache).location, headonly / "pipe")
    (headonly / "pipe" / "README.md").write_text("tiny-sdxl, copied where only the head node can see it\n")
    hide = can_hide_paths()
    env = ray_env(model_cache, secrets.token_hex(16),
                  # notice a vanished node within seconds instead of ~30 s
                  RAY_health_check_period_ms="1000", RAY_health_check_timeout_ms="1000",
                  RAY_health_check_failure_threshold="3")
    port = free_port()
    nodes: list[RayNode] = []
    service = None
    try:
        head = RayNode("head", [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--port", str(port),
                                "--num-cpus", str(HEAD_CPUS), "--num-gpus", "0", "--temp-dir", str(tmp / "ray"),
                                "--include-dashboard", "false", "--dashboard-port", str(free_port()),
                                "--ray-client-server-port", str(free_port()), *node_args()],
                       env, tmp / "head.log")
        nodes.append(head)
        wait_port(port, head)
        argv = [sys.executable, "-c", WORKER_START, "start", "--address", f"127.0.0.1:{port}",
                "--num-cpus", str(WORKER_CPUS), "--num-gpus", "0", *node_args()]
        worker = RayNode("worker", hidden(argv, [headonly, model_cache]) if hide else argv,
                         {**env, "MBP_SEARCH_CACHE": str(worker_cache)}, tmp / "worker.log")
        nodes.append(worker)
        service = ServiceProcess(tmp / "searches.db", env, secrets.token_urlsafe(24), tmp / "serve.log",
                                 "--ray-address", f"127.0.0.1:{port}", "--allow-model-dir", str(headonly))
        service.start()
        c = service.client()
        info = wait_for(lambda: c.get("/cluster").json(),
                        lambda d: sum(1 for n in d["nodes"] if n["alive"]) == 2, 120, "both Ray nodes")
        yield dict(head=head, worker=worker, service=service, client=c, info=info, tmp=tmp, hidden=hide,
                   headonly=headonly, worker_cache=worker_cache)
    finally:
        if service is not None:
            service.stop()
        for node in reversed(nodes):
            node.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def node_counts(db: Path, sid: str) -> dict[str, int]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        rows = con.execute("SELECT node, COUNT(*) FROM measurements WHERE search_id = ? GROUP BY node", (sid,))
        return dict(rows.fetchall())
    except sqlite3.OperationalError:
        return {}
    finally:
        con.close()


def nodes_of(cluster) -> tuple[str, str]:
    """(head, worker) node ids; the service and the drivers live on the head."""
    info = cluster["info"]
    nodes = {n["node_id"]: n for n in info["nodes"] if n["alive"]}
    head_id = info["service_node"]
    assert nodes[head_id]["is_head"] and all(n["address"] == "127.0.0.1" for n in nodes.values())
    return head_id, next(n for n in nodes if n != head_id)


def test_a_search_runs_on_both_nodes(cluster):
    c, service = cluster["client"], cluster["service"]
    head_id, worker_id = nodes_of(cluster)
    t0 = time.monotonic()
    r = c.post("/searches", json={**TINY, "num_recipes": 2})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    d = wait_for(lambda: c.get(f"/searches/{sid}").json(), lambda d: d["status"] not in ACTIVE, SEARCH_TIMEOUT_S,
                 "the search to finish", interval=1)
    assert d["status"] == "completed", d
    assert d["evaluations"] == 47 + 2 + 47 + floor_probes(47) + 2
    counts = node_counts(service.db, sid)
    # measurements record the node (Ray node id prefix) that ran them, and both nodes ran some
    assert set(counts) == {head_id[:16], worker_id[:16]} and min(counts.values()) >= 5, counts
    print(f"\nhead {head_id[:16]}, worker {worker_id[:16]}: measurements per node {counts}, "
          f"{time.monotonic() - t0:.1f} s from submit to completion")


def test_a_model_only_the_head_can_see_is_searched_on_both_nodes(cluster):
    """A local pipeline directory under headonly/ (allowed on the service), which the worker node
    sees as an empty directory: the worker node's evaluator gets the weights through the object
    store (shipped once by the driver), loads its own copy, passes the fingerprint check, and
    both nodes measure."""
    if not cluster["hidden"]:
        pytest.skip("no unprivileged user + mount namespaces (unshare -Urm): cannot hide a path from one node")
    c, service = cluster["client"], cluster["service"]
    head_id, worker_id = nodes_of(cluster)
    model = cluster["headonly"] / "pipe"
    worker_pid = cluster["worker"].proc.pid
    seen_by_worker = Path(f"/proc/{worker_pid}/root{model}/model_index.json")
    assert (model / "model_index.json").is_file() and not seen_by_worker.exists()
    t0 = time.monotonic()
    r = c.post("/searches", json={"model": str(model), "nbits": "8", "min_size": 16384, "resolution": 64,
                                  "num_recipes": 2})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    d = wait_for(lambda: c.get(f"/searches/{sid}").json(), lambda d: d["status"] not in ACTIVE, SEARCH_TIMEOUT_S,
                 "the search to finish", interval=1)
    assert d["status"] == "completed", d
    assert d["evaluations"] == 47 + 2 + 47 + floor_probes(47) + 2 and d["candidates"] == 47
    counts = node_counts(service.db, sid)
    assert set(counts) == {head_id[:16], worker_id[:16]} and min(counts.values()) >= 5, counts
    shipped = (d.get("progress") or {}).get("result", {}).get("shipped_bytes", 0)
    copies = list((cluster["worker_cache"] / "shipped").glob("*/README.md"))  # this model's copy, no other
    assert shipped > 0 and len(copies) == 1, (shipped, copies)
    copy = copies[0].parent
    copied = sum(f.stat().st_size for f in copy.rglob("*") if f.is_file() and not f.name.startswith("."))
    assert copied == shipped
    messages = [m for _, m in (d.get("progress") or {}).get("messages", [])]
    assert any("shipped through the object store" in m for m in messages), messages
    print(f"\nhead-only model: {shipped / 1e6:.2f} MB shipped through the object store once, copied to "
          f"{copy.relative_to(cluster['tmp'])} on the worker node; measurements per node {counts}; "
          f"{time.monotonic() - t0:.1f} s from submit to completion")


def test_a_search_survives_losing_a_node(cluster):
    c, service = cluster["client"], cluster["service"]
    head_id, worker_id = nodes_of(cluster)
    head_key, worker_key = head_id[:16], worker_id[:16]  # what evaluators store as `node`

    t0 = time.monotonic()
    r = c.post("/searches", json={**TINY, "num_recipes": 3})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    get = lambda: c.get(f"/searches/{sid}").json()  # noqa: E731

    # Both nodes measure; once the worker node has stored a few results, it vanishes.
    wait_for(lambda: (node_counts(service.db, sid), get()["status"]),
             lambda v: v[0].get(worker_key, 0) >= 3 or v[1] not in ACTIVE, SEARCH_TIMEOUT_S,
             "measurements from the worker node")
    before = node_counts(service.db, sid)
    assert before.get(worker_key, 0) >= 3, (
        f"no evaluator ran on the worker node {worker_key} (measurements per node: {before})")
    assert get()["status"] in ACTIVE, "the search ended before the worker node could be stopped"
    t_kill = time.monotonic() - t0
    killed = cluster["worker"].kill()
    wait_for(lambda: [p for p in killed if alive(p)], lambda left: not left, 30, "the worker node's processes to die")

    d = wait_for(get, lambda d: d["status"] not in ACTIVE, SEARCH_TIMEOUT_S, "the search to finish without the "
                 "worker node (a pool that can neither shrink nor re-create the lost evaluator stalls here)",
                 interval=1)
    t_done = time.monotonic() - t0
    after = node_counts(service.db, sid)
    assert d["status"] == "completed", d
    assert d["measurements"] == {"isolated": 47, "cumulative": 47, "floor": floor_probes(47)}
    # everything stored exactly once (identical recipes of Apple's thresholds are stored once)
    assert d["evaluations"] == 47 + 2 + 47 + floor_probes(47) + len(d["recipes"]) and 2 <= len(d["recipes"]) <= 3
    assert set(after) == {head_key, worker_key}, after
    assert after[worker_key] >= before[worker_key] and after[head_key] > before.get(head_key, 0)
    cl = c.get("/cluster").json()
    assert not next(n for n in cl["nodes"] if n["node_id"] == worker_id)["alive"]
    messages = [m for _, m in (d.get("progress") or {}).get("messages", [])]
    print(f"\nmeasurements per node when the worker was killed ({t_kill:.1f} s after submit): {before}; "
          f"at the end ({t_done:.1f} s): {after}; killed {len(killed)} processes of the worker node")
    print("driver messages:", *messages, sep="\n  ")
