"""Multi-node on one machine: a Ray head and an extra worker node started with `ray start` on
127.0.0.1 (their own ports, temp dir and auth token; one CPU each), plus a Core ML node (the
``coreml`` resource, no CPU for evaluators: a stand-in for a Mac but for Core ML prediction), the
search service joined to the head, searches submitted over HTTP. Measurements record the node that ran them and both
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
`unshare` the head-only test and the isolation test are skipped, with that reason (the other
tests still ship, but could not tell). The Core ML node's namespace also covers the service's
data directory (database, packages).

**Ports.** The head binds port 0 and Ray writes the address it got to its temp dir; the other
ports Ray needs (agents, client server) are picked free just before, and a node that exits on a
port clash is started again with fresh ones.
"""
from __future__ import annotations

import os
import re
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
from tests.coreml_helpers import check_search_luts, same_tree, sha256
from tests.search.test_service import (ACTIVE, SEARCH_TIMEOUT_S, TINY, TINY_ARGS, ServiceProcess, alive, descendants,
                                       free_port, kill_tree, ray_env, remote, wait_for)

pytestmark = pytest.mark.slow

HEAD_CPUS, WORKER_CPUS = 1, 1  # one evaluator per node
# `ray start` swaps 127.0.0.1 for the machine's outward address unless Ray is told it is a
# single-machine cluster (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0), and with that flag it refuses to
# start a *worker* node. The worker node therefore runs Ray's own `ray start` entry point with
# two attributes patched: the multi-node check passes and 127.0.0.1 stays 127.0.0.1.
WORKER_START = ("import sys, ray._private.ray_constants as c, ray._private.services as s; "
                "c.ENABLE_RAY_CLUSTER = True; s.resolve_ip_for_localhost = lambda host: host; "
                "from ray.scripts.scripts import main; sys.argv[0] = 'ray'; main()")


class NodeExited(Exception):
    """A node's `ray start` ended before the node was up."""


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


def wait_started(node: RayNode, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if node.proc.poll() is not None:
            raise NodeExited(node.name)
        if "Ray runtime started" in node.log.read_text(errors="replace"):
            return
        time.sleep(0.5)
    pytest.fail(f"ray node {node.name} did not start within {timeout} s:\n{node.log.read_text()[-3000:]}")


def head_address(temp_dir: Path, node: RayNode, timeout: float = 120) -> str:
    """The address the head got for `--port 0` (what `ray start` writes to its temp dir), once it answers."""
    wait_started(node, timeout)
    address = (temp_dir / "ray_current_cluster").read_text().strip()
    host, port = address.rsplit(":", 1)
    with socket.socket() as s:
        s.settimeout(5)
        assert s.connect_ex((host, int(port))) == 0, f"the Ray head does not answer at {address}"
    return address


CLASH = re.compile(r"(?i)address already in use|failed to bind|EADDRINUSE|port \d+ is (already )?in use")


def start_node(nodes: list[RayNode], name: str, argv, env: dict, log: Path, ready, attempts: int = 3,
               meanwhile=lambda: None):
    """Start a node (``argv()`` picks its ports), add it to ``nodes``, call ``meanwhile()`` once
    while it starts and return ``(node, ready(node))``. The ports that free_port() picked may be
    taken by someone else before Ray binds them: a node that exits on a port clash is started
    again with fresh ports; any other exit fails the test."""
    for attempt in range(1, attempts + 1):
        node = RayNode(name, argv(), env, log)
        nodes.append(node)
        if attempt == 1:
            meanwhile()
        try:
            return node, ready(node)
        except NodeExited:
            node.kill()
            nodes.remove(node)
            text = log.read_text(errors="replace")
            if attempt == attempts or not CLASH.search(text):
                pytest.fail(f"ray node {name} exited with {node.proc.returncode}:\n{text[-3000:]}")
            print(f"ray node {name}: port clash, starting it again with fresh ports (attempt {attempt + 1})")


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
    headonly, worker_cache, coreml_cache, data = (tmp / "headonly", tmp / "worker-cache", tmp / "coreml-cache",
                                                  tmp / "data")
    for d in (worker_cache, coreml_cache, data / "searches.db.service"):
        d.mkdir(parents=True)
    shutil.copytree(resolve_model("tiny-sdxl", model_cache).location, headonly / "pipe")
    (headonly / "pipe" / "README.md").write_text("tiny-sdxl, copied where only the head node can see it\n")
    hide = can_hide_paths()
    env = ray_env(model_cache, secrets.token_hex(16),
                  # notice a vanished node within seconds instead of ~30 s
                  RAY_health_check_period_ms="1000", RAY_health_check_timeout_ms="1000",
                  RAY_health_check_failure_threshold="3")
    nodes: list[RayNode] = []
    service = None
    try:
        head, address = start_node(
            nodes, "head", lambda: [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--port", "0",
                                    "--num-cpus", str(HEAD_CPUS), "--num-gpus", "0", "--temp-dir", str(tmp / "ray"),
                                    "--include-dashboard", "false", "--dashboard-port", str(free_port()),
                                    "--ray-client-server-port", str(free_port()), *node_args()],
            env, tmp / "head.log", lambda node: head_address(tmp / "ray", node))

        def joining(*extra: str, hide_paths: list[Path]):
            argv = [sys.executable, "-c", WORKER_START, "start", "--address", address, "--num-gpus", "0", *extra]
            return lambda: hidden([*argv, *node_args()], hide_paths) if hide else [*argv, *node_args()]

        # one node starting at a time: a raylet that cannot register in 30 s aborts
        worker, _ = start_node(nodes, "worker", joining("--num-cpus", str(WORKER_CPUS),
                                                        hide_paths=[headonly, model_cache]),
                               {**env, "MBP_SEARCH_CACHE": str(worker_cache)}, tmp / "worker.log", wait_started)
        service = ServiceProcess(data / "searches.db", env, secrets.token_urlsafe(24), tmp / "serve.log",
                                 "--ray-address", address, "--allow-model-dir", str(headonly))
        coreml, _ = start_node(nodes, "coreml", joining("--num-cpus", "0", "--resources", '{"coreml": 1}',
                                                        hide_paths=[headonly, model_cache, data]),
                               {**env, "MBP_SEARCH_CACHE": str(coreml_cache)}, tmp / "coreml.log", wait_started,
                               meanwhile=service.start)  # the service joins the cluster while the node starts
        c = service.client()
        info = wait_for(lambda: [node.check() for node in nodes] and c.get("/cluster").json(),
                        lambda d: sum(1 for n in d["nodes"] if n["alive"]) == 3, 120, "the three Ray nodes")
        yield dict(head=head, worker=worker, coreml=coreml, service=service, client=c, info=info, tmp=tmp,
                   hidden=hide, headonly=headonly, worker_cache=worker_cache, coreml_cache=coreml_cache, data=data,
                   env=env)
    finally:
        if service is not None:
            service.stop()
        for node in reversed(nodes):
            node.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def node_rows(db: Path, sid: str) -> dict[str, str]:
    """Each stored measurement's key and the node that ran it."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return dict(con.execute("SELECT key, node FROM measurements WHERE search_id = ?", (sid,)).fetchall())
    except sqlite3.OperationalError:
        return {}
    finally:
        con.close()


def node_counts(db: Path, sid: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in node_rows(db, sid).values():
        counts[node] = counts.get(node, 0) + 1
    return counts


def nodes_of(cluster) -> tuple[str, str]:
    """(head, worker) node ids; the service and the drivers live on the head (the Core ML node
    offers no CPU, so no evaluator runs there)."""
    info = cluster["info"]
    nodes = {n["node_id"]: n for n in info["nodes"] if n["alive"]}
    head_id = info["service_node"]
    assert nodes[head_id]["is_head"] and all(n["address"] == "127.0.0.1" for n in nodes.values())
    return head_id, next(n for n, d in nodes.items() if n != head_id and "coreml" not in d["resources"])


def test_the_nodes_see_only_what_they_should(cluster):
    """The isolation the head-only and Core ML tests rely on: the worker node sees the head's
    model cache and head-only models as empty directories; the Core ML node sees neither those
    nor the service's data directory (database, packages)."""
    if not cluster["hidden"]:
        pytest.skip("no unprivileged user + mount namespaces (unshare -Urm): the nodes share every path, so "
                    "neither the head-only model nor the Core ML node's isolation can be checked")
    service, model = cluster["service"], cluster["headonly"] / "pipe" / "model_index.json"
    cache_file = next(f for f in Path(cluster["env"]["MBP_SEARCH_CACHE"]).rglob("*") if f.is_file())
    seen = lambda node, path: Path(f"/proc/{cluster[node].proc.pid}/root{path}").exists()  # noqa: E731
    assert service.db.is_file() and model.is_file() and cache_file.is_file()
    assert not seen("worker", model) and not seen("worker", cache_file) and seen("worker", service.db)
    assert not seen("coreml", model) and not seen("coreml", cache_file) and not seen("coreml", service.db)
    assert seen("coreml", ROOT / "pyproject.toml")  # /proc/<pid>/root shows what the node sees, not nothing


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
    cluster["both_nodes"] = (sid, d)


def test_a_search_reuses_what_both_nodes_measured(cluster):
    """Issue 33 on a cluster: a later search of the same model and protocol takes every measurement
    and baseline the two nodes' evaluators stored (each row names the search it came from, the
    values are those rows' own) and runs only its recipes."""
    c, service = cluster["client"], cluster["service"]
    if "both_nodes" not in cluster:
        test_a_search_runs_on_both_nodes(cluster)
    first, _ = cluster["both_nodes"]
    con = sqlite3.connect(f"file:{service.db}?mode=ro", uri=True, timeout=30)
    try:
        source = sorted(con.execute("SELECT reuse_key, psnr || ' ' || per_prompt_json FROM measurements "
                                    "WHERE search_id = ?", (first,)).fetchall())
        source_nodes = {n for (n,) in con.execute("SELECT DISTINCT node FROM measurements WHERE search_id = ?",
                                                  (first,))}
    finally:
        con.close()
    assert len(source_nodes) == 2, source_nodes
    r = c.post("/searches", json={**TINY, "num_recipes": 2})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    d = wait_for(lambda: c.get(f"/searches/{sid}").json(), lambda d: d["status"] not in ACTIVE, SEARCH_TIMEOUT_S,
                 "the search to finish", interval=1)
    assert d["status"] == "completed", d
    con = sqlite3.connect(f"file:{service.db}?mode=ro", uri=True, timeout=30)
    try:
        got = con.execute("SELECT reuse_key, psnr || ' ' || per_prompt_json, reused_from FROM measurements "
                          "WHERE search_id = ?", (sid,)).fetchall()
        baselines = con.execute("SELECT reused_from FROM baselines WHERE search_id = ?", (sid,)).fetchall()
    finally:
        con.close()
    assert len(got) == len(source) == 47 + 47 + floor_probes(47)
    assert sorted((key, value) for key, value, _ in got) == source and {o for *_, o in got} == {first}
    assert len(baselines) == 2 and all(origin == first for (origin,) in baselines)
    measured = sum(r["psnr"] is not None for r in d["recipes"])
    assert (d["reused"], d["evaluations"]) == (len(got) + 2, measured), d


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


def driver_pids(head: RayNode, sid: str) -> list[int]:
    """The Ray worker process on the head running the search's driver (the task's name is its
    process title: ray::search-driver-<id>, search.service.supervisor)."""
    pids = []
    for pid in descendants(head.proc.pid):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if title.startswith((f"ray::search-driver-{sid}", "ray::drive")):
            pids.append(pid)
    return pids


@pytest.mark.timeout(1800)  # a search, a Core ML phase killed and resumed, `--here`: ~15 min on a loaded 2-core box
def test_apply_all_ships_packages_from_the_coreml_node_and_resumes_after_kill(cluster, tmp_path):
    """`search submit --apply all --server`: after its recipes the search applies them on the Core
    ML node (which sees neither the service's data directory nor the model: the weights come
    through the object store), ships each package to the head; the driver is SIGKILLed after the
    first package, `search resume` ships the rest without redoing it; the remote CLI downloads
    packages whose digest is the node's own zip and whose LUTs and indices are the search's."""
    c, service = cluster["client"], cluster["service"]
    coreml_cache = cluster["coreml_cache"]  # what the Core ML node cannot see: test_the_nodes_see_only_what_they_should
    t0 = time.monotonic()
    proc = remote(service, "submit", *TINY_ARGS, "--num-recipes", "2", "--apply", "all",
                  "--no-reuse")  # its own measurements: the evaluation count below is this search's
    assert proc.returncode == 0, proc.stderr
    sid = proc.stdout.split()[-1]
    get = lambda: c.get(f"/searches/{sid}").json()  # noqa: E731
    d = wait_for(get, lambda d: (d.get("coreml") or {}).get("applied", 0) >= 1 or d["status"] not in ACTIVE,
                 3 * SEARCH_TIMEOUT_S, "the first package shipped (the search, then the Core ML phase)", interval=0.5)
    t_first = time.monotonic() - t0
    assert d["status"] in ACTIVE and d["phase"] == "coreml" and d["coreml"]["applied"] == 1, d
    first = d["coreml"]["packages"]
    pids = driver_pids(cluster["head"], sid)
    assert len(pids) == 1, pids
    os.kill(pids[0], signal.SIGKILL)
    d = wait_for(get, lambda d: d["status"] == "interrupted", 60, "the search to show interrupted")
    t_resume = time.monotonic()
    proc = remote(service, "resume", sid)
    assert proc.returncode == 0, proc.stderr
    d = wait_for(get, lambda d: d["status"] not in ACTIVE, 2 * SEARCH_TIMEOUT_S, "the resumed search", interval=1)
    t_done = time.monotonic()
    assert d["status"] == "completed", d
    cm = d["coreml"]
    keys = {r["key"] for r in d["recipes"]}
    assert cm["status"] == "completed" and set(cm["packages"]) == keys and len(keys) == 2, cm
    assert cm["applied"] == cm["validated"] == cm["recipes"] == 2 and cm["failed"] == [], cm
    assert all(cm["packages"][k] == p for k, p in first.items())  # shipped before the kill: not redone
    messages = [m for _, m in (d.get("progress") or {}).get("messages", [])]
    assert any("1 recipe(s) to apply (1 already shipped and validated)" in m for m in messages), messages
    # the search's measurements are those of a search without the Core ML stage
    assert d["evaluations"] == 47 + 2 + 47 + floor_probes(47) + 2
    # the Core ML node loaded the model from the weights the driver shipped (its own copy)
    assert list((coreml_cache / "shipped").glob("*/model_index.json")), list(coreml_cache.rglob("*"))[:20]

    out = tmp_path / "packages"
    t_dl = time.monotonic()
    proc = remote(service, "download", sid, "--mlpackage", "all", "-o", str(out))
    t_dl = time.monotonic() - t_dl
    assert proc.returncode == 0, proc.stderr
    head_store = cluster["data"] / "searches.db.service" / "packages" / sid
    for key, p in cm["packages"].items():
        node_package = Path(d["validations"][key]["mlpackage"])
        assert node_package.is_relative_to(coreml_cache / "coreml" / sid)  # made on the Core ML node
        node_zip = node_package.with_name(node_package.name + ".zip")
        head_zip = next(f for f in head_store.iterdir() if f.name.endswith(".mlpackage.zip") and
                        f.stat().st_size == p["size_bytes"] and sha256(f) == p["sha256"])
        assert sha256(node_zip) == sha256(head_zip) == p["sha256"]
        assert same_tree(out / node_package.name, node_package)
        assert "search's LUTs and indices" in check_search_luts(out / node_package.name, service.db, sid)
        assert d["validations"][key]["structural_ok"] and d["validations"][key]["numeric_ok"]
    mb = sum(p["size_bytes"] for p in cm["packages"].values()) / 1e6
    ship_s = sum(p["ship_s"] for p in cm["packages"].values())
    print(f"\ncoreml phase: first package {t_first:.1f} s after submit; resumed run {t_done - t_resume:.1f} s; "
          f"Core ML job {cm['seconds']:.1f} s over both runs; {mb:.2f} MB shipped node->head in {ship_s:.2f} s "
          f"({mb / ship_s:.1f} MB/s); downloaded through the remote CLI in {t_dl:.1f} s")

    # for a finished search: queue again through `search apply --server` (nothing left to do)
    key = sorted(keys)[0]
    proc = remote(service, "apply", sid, "--recipe", key)
    assert proc.returncode == 0 and "(1 recipe(s), 1 already shipped)" in proc.stdout, proc.stdout + proc.stderr
    cm2 = wait_for(lambda: c.get(f"/searches/{sid}/coreml").json()["coreml"], lambda v: v["status"] == "completed",
                   120, "the Core ML job on the finished search")
    assert cm2["packages"] == cm["packages"]
    # a resumable download (Range), the digest header; bad keys and ids get one line; the token is needed
    name = f"{next(iter(cm['packages']))}.mlpackage.zip"
    whole = c.get(f"/searches/{sid}/coreml/{name}")
    assert whole.status_code == 200 and whole.headers["x-checksum-sha256"] == cm["packages"][name[:-14]]["sha256"]
    part = c.get(f"/searches/{sid}/coreml/{name}", headers={"Range": "bytes=1000-"})
    assert part.status_code == 206 and part.content == whole.content[1000:]
    for path, status in ((f"/searches/{sid}/coreml/nope.mlpackage.zip", 404), (f"/searches/{sid}/coreml/x.txt", 404),
                         ("/searches/ffffffff/coreml", 404)):
        r = c.get(path)
        assert r.status_code == status and "\n" not in r.json()["detail"], (path, r.text)
    r = c.post(f"/searches/{sid}/coreml", json={"apply": "nope"})
    assert r.status_code == 422 and "no recipe 'nope'" in r.json()["detail"], r.text
    assert service.client(token=None).get(f"/searches/{sid}/coreml/{name}").status_code == 401

    # a Mac outside the cluster: `search apply --here` fetches the recipe and its exact palettes over
    # HTTP, applies and validates in its own process, and posts the validation back to the service
    here = tmp_path / "here"
    t_here = time.monotonic()
    proc = remote(service, "apply", sid, "--here", "-o", str(here), "--recipe", key, timeout=2 * SEARCH_TIMEOUT_S)
    t_here = time.monotonic() - t_here
    assert proc.returncode == 0, proc.stdout + proc.stderr
    v = get()["validations"][key]
    assert v["node"].endswith("(--here)") and v["structural_ok"] and v["numeric_ok"], v
    assert Path(v["mlpackage"]).is_relative_to(here.resolve())
    assert "search's LUTs and indices" in check_search_luts(Path(v["mlpackage"]), service.db, sid)
    r = c.post(f"/searches/{sid}/coreml/validations", json=[{**v, "recipe_key": "nope"}])
    assert r.status_code == 422 and "no recipe 'nope'" in r.json()["detail"], r.text
    print(f"search apply --here (1 recipe: fetch, convert, palettize, validate, post): {t_here:.1f} s")


def test_a_search_survives_losing_a_node(cluster):
    c, service = cluster["client"], cluster["service"]
    head_id, worker_id = nodes_of(cluster)
    head_key, worker_key = head_id[:16], worker_id[:16]  # what evaluators store as `node`

    t0 = time.monotonic()
    # its own measurements, not copies of the earlier searches of this model (issue 33's reuse)
    r = c.post("/searches", json={**TINY, "num_recipes": 3, "reuse": False})
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
    time.sleep(1)  # a result the worker sent just before it died is stored by now
    at_kill = node_rows(service.db, sid)

    d = wait_for(get, lambda d: d["status"] not in ACTIVE, SEARCH_TIMEOUT_S, "the search to finish without the "
                 "worker node (a pool that can neither shrink nor re-create the lost evaluator stalls here)",
                 interval=1)
    t_done = time.monotonic() - t0
    final = node_rows(service.db, sid)
    after = node_counts(service.db, sid)
    assert d["status"] == "completed", d
    measurements = 47 + 47 + floor_probes(47)
    assert d["measurements"] == {"isolated": 47, "cumulative": 47, "floor": floor_probes(47)}
    # What the worker node stored before it died is kept as it was; everything after came from the head.
    assert {k: final.get(k) for k in at_kill} == at_kill
    assert {final[k] for k in final.keys() - at_kill.keys()} == {head_key}
    assert after == {worker_key: sum(n == worker_key for n in at_kill.values()),
                     head_key: measurements - sum(n == worker_key for n in at_kill.values())}, (after, len(at_kill))
    # Everything stored once (identical recipes of Apple's thresholds are stored once), and computed
    # once: the driver received exactly one result per stored row (the lost evaluator's item in
    # flight never came back; a recomputed item would count twice here and nowhere in the rows).
    total = 2 + measurements + len(d["recipes"])  # baselines, isolated + cumulative + floor probes, recipes
    assert 2 <= len(d["recipes"]) <= 3 and d["evaluations"] == total
    assert d["progress"]["result"]["evaluations"] == total, d["progress"]["result"]
    cl = c.get("/cluster").json()
    assert not next(n for n in cl["nodes"] if n["node_id"] == worker_id)["alive"]
    messages = [m for _, m in (d.get("progress") or {}).get("messages", [])]
    print(f"\nmeasurements per node when the worker was killed ({t_kill:.1f} s after submit): {before}; "
          f"at the end ({t_done:.1f} s): {after}; killed {len(killed)} processes of the worker node")
    print("driver messages:", *messages, sep="\n  ")
