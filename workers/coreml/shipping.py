"""The Core ML worker as a Ray actor on the Core ML node, for the cluster's ``coreml`` phase.

One actor per job: it loads the model once (from the weights the driver shipped, as the
evaluators do), applies and validates one recipe per call (`apply`), builds the recipe's
Resources folder for Apple's Swift pipeline (`bundle`), and zips each on its own disk. The
driver then pulls a zip to the head in CHUNK-sized pieces (`pieces`, a Ray streaming generator
with backpressure), so a package is never whole in memory on either side; `apply` and `bundle`
return the zip's size and sha256, which the head checks before it keeps the file.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import tempfile
import zipfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from workers.coreml.apply import manifest_path
from workers.coreml.task import CoreMLJob, RecipeOutcome, _evaluator, apply_job

CHUNK = 8 * 2**20  # bytes per object-store piece of a package
IN_FLIGHT = 4      # pieces the generator may run ahead of the head (backpressure)
BUNDLE_TOP = "Resources"  # the one folder of a bundle zip: what Swift's resourcesAt: is given
_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass(frozen=True)
class Packed:
    """One recipe applied on the Core ML node: its validation and its zip, ready to ship."""
    outcome: RecipeOutcome
    size_bytes: int
    sha256: str
    node: str


@dataclass(frozen=True)
class PackedBundle:
    """One recipe's Resources folder built on the Core ML node and zipped, ready to ship."""
    result: object  # workers.coreml.bundle.build.BundleResult
    options: dict   # the BundleOptions it was built with
    size_bytes: int
    sha256: str
    node: str


def zip_files(files: list[tuple[Path, str]], dest: Path) -> tuple[int, str]:
    """Zip ``files`` ((path, name in the zip), in the order given) into ``dest``: stored, not
    deflated (weights do not compress), each entry with a fixed time and mode, built aside and
    renamed; returns (bytes, sha256). The same files in the same order give the same zip."""
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent)
    os.close(fd)
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


def zip_package(package: Path, dest: Path) -> tuple[int, str]:
    """Zip a .mlpackage directory and its manifest (``<name>.mbp.json`` beside it, which `search
    validate` reads) into ``dest`` (`zip_files`: the same package gives the same zip)."""
    manifest = manifest_path(package)
    files = [(manifest, manifest.name)] if manifest.is_file() else []
    files += [(p, f"{package.name}/{p.relative_to(package).as_posix()}")
              for p in sorted(package.rglob("*")) if p.is_file()]
    return zip_files(files, dest)


def zip_bundle(folder: Path, dest: Path) -> tuple[int, str]:
    """Zip a Resources folder into ``dest`` under one top folder ``Resources/`` (unzipped by hand,
    it is the folder Swift's ``resourcesAt:`` takes): every regular file, sorted by path; hidden
    top-level entries (a build's leftovers) are not part of a bundle and stay out."""
    files = [(p, f"{BUNDLE_TOP}/{p.relative_to(folder).as_posix()}") for p in sorted(folder.rglob("*"))
             if p.is_file() and not p.relative_to(folder).parts[0].startswith(".")]
    return zip_files(files, dest)


def node_out_dir(search_id: str) -> Path:
    """The Core ML node's own working directory for a search (its cache, never the head's)."""
    from workers.tiny_models import default_cache_dir

    return default_cache_dir() / "coreml" / search_id


class CoreMLWorker:
    """Plain class (tests can use it in-process); the driver runs it as a Ray actor.
    ``model_version``: what the search says it searched, written in each bundle's manifest."""

    def __init__(self, job: CoreMLJob, model_version: str = ""):
        self.job = job if job.out_dir else replace(job, out_dir=str(node_out_dir(job.search_id)))
        self.model_version = model_version
        Path(self.job.out_dir).mkdir(parents=True, exist_ok=True)
        self.ev = self.fingerprint = None
        self.zips: dict[tuple[str, str], Path] = {}  # (kind, key) -> the zip on this node's disk

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
        self.zips[("mlpackage", key)] = dest
        return Packed(outcome, size, sha256, node)

    def bundle_family(self) -> str:
        """Swift's family of the job's model (`contract.NO_SWIFT_PIPELINE` ones get no bundle)."""
        from workers.coreml.bundle.contract import bundle_family

        self.node()
        return bundle_family(self.ev.spec.family, self.ev.spec.img2img)

    def bundle(self, key: str) -> PackedBundle:
        """Build one recipe's Resources folder (default options) and zip it for shipping. The
        recipe-independent parts (the float16 denoiser, text encoders, VAE) are converted once per
        search and kept in ``bundle-cache`` for the other recipes. A whole folder left by an
        earlier actor is built again (its checks were not kept); a killed build resumes component
        by component (`build_bundle`). The folder is removed once zipped: the zip holds every
        file, and the node's disk need not hold the bundle twice."""
        from workers.coreml.bundle.build import BundleJob, build_bundle
        from workers.coreml.bundle.contract import BundleOptions

        node = self.node()
        recipe = next(r for r in self.job.recipes if r.key == key)
        options = BundleOptions()
        root = Path(self.job.out_dir) / "bundles"
        folder = root / _SAFE.sub("_", key)
        shutil.rmtree(folder, ignore_errors=True)
        job = BundleJob(self.job.search_id, self.job.model, self.fingerprint, key, dict(recipe.bits),
                        recipe.measured_psnr, self.job.palettes, options, str(folder), self.model_version,
                        str(Path(self.job.out_dir) / "bundle-cache"))
        result = build_bundle(job, self.ev)
        dest = root / f"{folder.name}.bundle.zip"
        size, sha256 = zip_bundle(folder, dest)
        shutil.rmtree(folder)
        self.zips[("bundle", key)] = dest
        return PackedBundle(result, asdict(options), size, sha256, node)

    def pieces(self, key: str, kind: str = "mlpackage"):
        """The zip of ``key``'s package or bundle (``kind``) in CHUNK-sized pieces (a generator:
        one object-store object each)."""
        with open(self.zips[(kind, key)], "rb") as fh:
            while block := fh.read(CHUNK):
                yield block
