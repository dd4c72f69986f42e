"""The cluster's ``coreml`` phase on a local Ray (``coreml_node any``): the Core ML worker actor
applies one recipe of the completed search with its exact palettes, the packages come back to the
head's package store in pieces with their sha256, a second run redoes nothing, and the local
CLI downloads, checks and unpacks them. The multi-node version (a Core ML node that sees neither
the head's data nor its model) is in test_multinode.py.

Independent references: hashlib over the file the node wrote and over the file the head keeps;
the node's package directory compared file by file with the unpacked download; every LUT and
index in the downloaded package compared with the stored palettes by
`workers.coreml.validate.check_structure` (as tests/workers/test_coreml.py does).
"""
from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from storage import Storage
from storage.coreml_store import CoreMLStore
from storage.package_store import PackageStore, PackageWriter
from tests.coreml_helpers import check_search_luts, same_tree, sha256

pytestmark = pytest.mark.slow


def test_unfinished_zip_is_never_kept(tmp_path):
    """A piece lost on the way: the digest differs, nothing is renamed into place."""
    w = PackageWriter(tmp_path / "a" / "k.mlpackage.zip")
    w.write(b"abc")
    with pytest.raises(OSError, match="arrived damaged"):
        w.commit(4, hashlib.sha256(b"abcd").hexdigest())
    assert not any((tmp_path / "a").iterdir())
    w = PackageWriter(tmp_path / "a" / "k.mlpackage.zip")
    w.write(b"abcd")
    w.commit(4, hashlib.sha256(b"abcd").hexdigest())
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["k.mlpackage.zip"]


def test_coreml_phase_ships_packages_and_resumes(completed_tiny_search, tmp_path):
    import ray
    from typer.testing import CliRunner

    from search.cli.app import app
    from search.driver.coreml_phase import CoreMLPhase

    db, sid = Path(completed_tiny_search["db"]), completed_tiny_search["search_id"]
    # one recipe (its package and its bundle: a minute of conversions each on CI's 2 cores), the
    # one with the most formats (2, 4 and 6 bits); `--apply all` is test_multinode.py's
    recipe = next(iter(completed_tiny_search["recipes"]))
    packages = PackageStore(tmp_path / "packages")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        with Storage(db) as st:
            search = st.get_search(sid)
            CoreMLStore(st).request(sid, recipe, "any")
            phase = CoreMLPhase(st, search, packages)
            phase.run()
            job, stored = CoreMLStore(st).job(sid), CoreMLStore(st).packages(sid)
            assert job.status == "completed", job
            assert set(stored) == {recipe}
            shipped = phase.shipped_bytes
            print(f"\n{len(stored)} packages, {shipped / 1e6:.2f} MB shipped in {phase.ship_s:.2f} s "
                  f"({shipped / 1e6 / phase.ship_s:.1f} MB/s); phase {job.seconds:.1f} s")
            validations = st.validations(sid)
            for key, p in stored.items():
                assert p.status == "shipped" and p.detail == "", p
                head_zip = packages.path(p.path)
                node_package = Path(validations[key].mlpackage)  # the node's own copy (same machine here)
                node_zip = node_package.with_name(node_package.name + ".zip")
                assert sha256(head_zip) == sha256(node_zip) == p.sha256 and head_zip.stat().st_size == p.size_bytes
                assert validations[key].structural_ok and validations[key].numeric_ok
            assert shipped == sum(p.size_bytes for p in stored.values())
            # again: everything is shipped and validated, so nothing is redone
            CoreMLStore(st).request(sid, recipe, "any")
            again = CoreMLPhase(st, search, packages)
            again.run()
            assert again.shipped_bytes == 0 and CoreMLStore(st).job(sid).status == "completed"
            assert CoreMLStore(st).packages(sid) == stored
    finally:
        ray.shutdown()
    # the local CLI: fetch, check the digest, unpack; structurally the search's LUTs and indices
    beside = PackageStore.beside(db)
    beside.root.mkdir(parents=True, exist_ok=True)
    for p in stored.values():
        dest = beside.path(p.path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(packages.path(p.path).read_bytes())
    out = tmp_path / "download"
    res = CliRunner().invoke(app, ["download", sid, "--mlpackage", "all", "-o", str(out), "--db", str(db)])
    assert res.exit_code == 0, res.output
    for key, p in stored.items():
        node_package = Path(validations[key].mlpackage)
        got = out / node_package.name
        assert same_tree(got, node_package)
        assert (out / f"{got.stem}.mbp.json").read_bytes() == node_package.with_name(f"{got.stem}.mbp.json").read_bytes()
        assert "search's LUTs and indices" in check_search_luts(got, db, sid)
    with zipfile.ZipFile(packages.path(next(iter(stored.values())).path)) as zf:
        assert all(n.split("/")[0].endswith(".mlpackage") or n.endswith(".mbp.json") for n in zf.namelist())
