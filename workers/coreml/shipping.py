"""The Core ML worker as a Ray actor on the Core ML node, for the cluster's ``coreml`` phase.

One actor per job: it loads the model once (from the weights the driver shipped, as the
evaluators do), applies and validates one recipe per call (`apply`), and zips each package on
its own disk. The driver then pulls the zip to the head in CHUNK-sized pieces (`pieces`, a Ray
streaming generator with backpressure), so a package is never whole in memory on either side;
`apply` returns the zip's size and sha256, which the head checks before it keeps the file.
"""
from __future__ import annotations

import hashlib
import os
import socket
import tempfile
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

from workers.coreml.apply import manifest_path
from workers.coreml.task import CoreMLJob, RecipeOutcome, _evaluator, apply_job

CHUNK = 8 * 2**20  # bytes per object-store piece of a package
IN_FLIGHT = 4      # pieces the generator may run ahead of the head (backpressure)


@dataclass(frozen=True)
class Packed:
    """One recipe applied on the Core ML node: its validation and its zip, ready to ship."""
    outcome: RecipeOutcome
    size_bytes: int
    sha256: str
    node: str


def zip_package(package: Path, dest: Path) -> tuple[int, str]:
    """Zip a .mlpackage directory and its manifest (``<name>.mbp.json`` beside it, which `search
    validate` reads) into ``dest``: stored, not deflated (weights do not compress), built aside
    and renamed; returns (bytes, sha256). Entries are sorted with a fixed time, so the same
    package gives the same zip."""
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent)
    os.close(fd)
    manifest = manifest_path(package)
    files = [(manifest, manifest.name)] if manifest.is_file() else []
    files += [(p, f"{package.name}/{p.relative_to(package).as_posix()}")
              for p in sorted(package.rglob("*")) if p.is_file()]
    try:
        with zipfile.ZipFile(name, "w", zipfile.ZIP_STORED) as zf:
            for path, arcname in files:
                info = zipfile.ZipInfo(arcname, (1980, 1, 1, 0, 0, 0))
                info.external_attr = 0o644 << 16
                with open(path, "rb") as src, zf.open(info, "w", force_zip64=True) as out:
                    while block := src.read(CHUNK):
                        out.write(block)
        sha = hashlib.sha256()
        with open(name, "rb") as fh:
            while block := fh.read(CHUNK):
                sha.update(block)
        os.replace(name, dest)
    finally:
        Path(name).unlink(missing_ok=True)
    return dest.stat().st_size, sha.hexdigest()


def node_out_dir(search_id: str) -> Path:
    """The Core ML node's own working directory for a search (its cache, never the head's)."""
    from workers.tiny_models import default_cache_dir

    return default_cache_dir() / "coreml" / search_id


class CoreMLWorker:
    """Plain class (tests can use it in-process); the driver runs it as a Ray actor."""

    def __init__(self, job: CoreMLJob):
        self.job = job if job.out_dir else replace(job, out_dir=str(node_out_dir(job.search_id)))
        Path(self.job.out_dir).mkdir(parents=True, exist_ok=True)
        self.ev = self.fingerprint = None
        self.zips: dict[str, Path] = {}

    def node(self) -> str:
        """Load the model (shipped weights copied once per node) and say where this runs."""
        from workers.models import denoiser_fingerprint

        if self.ev is None:
            self.ev = _evaluator(self.job)
            self.fingerprint = self.job.fingerprint or denoiser_fingerprint(self.ev.denoiser)
        return socket.gethostname()

    def apply(self, key: str) -> Packed:
        """Apply and validate one recipe of the job; zip its package for shipping."""
        node = self.node()
        recipe = next(r for r in self.job.recipes if r.key == key)
        _, (outcome,) = apply_job(replace(self.job, recipes=(recipe,)), self.ev, self.fingerprint)
        package = Path(outcome.mlpackage)
        dest = package.with_name(package.name + ".zip")
        size, sha256 = zip_package(package, dest)
        self.zips[key] = dest
        return Packed(outcome, size, sha256, node)

    def pieces(self, key: str):
        """The zip of ``key`` in CHUNK-sized pieces (a generator: one object-store object each)."""
        with open(self.zips[key], "rb") as fh:
            while block := fh.read(CHUNK):
                yield block
