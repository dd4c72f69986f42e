"""A model's weights, fetched once per cluster.

The node that prepares a search holds the pipeline directory (a local path, a built-in model, or
the Hub snapshot it downloaded: `fetch_pipeline`). When the cluster has other nodes,
`WeightShipper` puts the files a pipeline load reads (`pipeline_files`: configs, tokenizers,
and per component folder the fp16 variant's weights where published, else the plain ones) into
Ray's object store once, in CHUNK-sized objects; the evaluators' `WeightsManifest` carries their
refs. An evaluator on the preparing node loads the directory itself; one on another node
materialises the files into its own cache (`local_copy`: ``<MBP_SEARCH_CACHE>/shipped/<digest>``,
built aside and renamed into place, one builder per node) and loads that. The UNet fingerprint
check every evaluator makes is unchanged, so a bad copy is refused like a different model.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable

from common.files import publish_dir
from workers.model_spec import ModelError, ModelSpec

CHUNK = 64 * 2**20  # bytes per object-store object
SKIP_SUFFIXES = (".onnx", ".onnx_data", ".msgpack", ".h5", ".ckpt", ".pb", ".tflite", ".mlpackage", ".pt")
WEIGHT_MARKS = (".safetensors", ".bin")


def _is_weight(name: str) -> bool:
    return any(mark in name for mark in WEIGHT_MARKS)


def choose_files(names: list[str]) -> list[str]:
    """Of a pipeline's relative file names, those a load reads: per folder, the fp16 weights where
    published, else the plain ones; safetensors rather than .bin where both exist."""
    by_dir: dict[str, list[str]] = {}
    for name in names:
        parts = PurePosixPath(name).parts
        if any(p.startswith(".") for p in parts) or name.endswith(SKIP_SUFFIXES):
            continue
        by_dir.setdefault(str(PurePosixPath(name).parent), []).append(name)
    chosen = []
    for files in by_dir.values():
        weights = [f for f in files if _is_weight(PurePosixPath(f).name)]
        pool = [f for f in weights if ".fp16." in f] or [f for f in weights if ".fp16." not in f]
        if any(".safetensors" in f for f in pool):
            pool = [f for f in pool if ".safetensors" in f]
        chosen += [f for f in files if f not in weights or f in pool]
    return sorted(chosen)


def pipeline_files(root: Path) -> list[tuple[str, int]]:
    """(relative path, bytes) of what `choose_files` keeps under ``root`` (symlinks followed, as
    in a Hub snapshot)."""
    names = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = Path(dirpath).relative_to(root)
        names += [(rel / f).as_posix() for f in filenames]
    return [(name, (root / name).stat().st_size) for name in choose_files(names)]


def fetch_pipeline(spec: ModelSpec, progress: Callable[[int, int], None] = lambda done, total: None) -> Path:
    """The local pipeline directory of ``spec``: a Hub model is downloaded (fp16 variant where
    published) with ``progress(bytes fetched, bytes in all)``; a local or built-in one is there."""
    if spec.source != "hub":
        total = sum(size for _, size in pipeline_files(Path(spec.location)))
        progress(total, total)
        return Path(spec.location)
    from diffusers import DiffusionPipeline

    from workers.hub import hub_download, hub_offline
    from workers.models import quiet_hf, with_variant

    def download() -> str:
        with quiet_hf():
            return with_variant(lambda variant: DiffusionPipeline.download(
                spec.location, variant=variant, local_files_only=hub_offline()), spec)

    return Path(hub_download(spec, download, choose_files, progress))


@dataclass(frozen=True)
class WeightsManifest:
    """Where a search's pipeline directory lives and, when shipped, its files in the object store."""
    digest: str                  # identifies the file set (names, sizes, UNet fingerprint)
    origin_node: str             # Ray node id of the node that holds the directory
    origin_path: str
    files: tuple = field(default=())   # ((relative path, bytes, (ObjectRef, ...)), ...); () when not shipped

    @property
    def shipped_bytes(self) -> int:
        return sum(size for _, size, _ in self.files)


class WeightShipper:
    """The driver's side: `manifest()` for each evaluator it creates. The files go into the object
    store the first time the cluster has a node other than this one, and stay there (refs held
    here) while the search runs, for replacements and new nodes."""

    def __init__(self, root: Path | str, fingerprint: str, on_shipped: Callable[[int, int], None] = lambda n, b: None):
        import ray

        self.root, self.files = Path(root), pipeline_files(Path(root))
        listing = json.dumps([self.files, fingerprint]).encode()
        self.node = ray.get_runtime_context().get_node_id()
        self.base = WeightsManifest(hashlib.sha256(listing).hexdigest()[:24], self.node, str(self.root))
        self.shipped: WeightsManifest | None = None
        self.on_shipped = on_shipped

    def _other_nodes(self) -> bool:
        import ray

        return any(n.get("Alive") and n["NodeID"] != self.node for n in ray.nodes())

    def manifest(self) -> WeightsManifest:
        if self.shipped is None and self._other_nodes():
            self.shipped = self._ship()
        return self.shipped or self.base

    def _ship(self) -> WeightsManifest:
        import ray

        files = []
        for name, size in self.files:
            refs = []
            with open(self.root / name, "rb") as fh:
                while chunk := fh.read(CHUNK):
                    refs.append(ray.put(chunk))
            files.append((name, size, tuple(refs)))
        manifest = WeightsManifest(self.base.digest, self.node, str(self.root), tuple(files))
        self.on_shipped(len(files), manifest.shipped_bytes)
        return manifest


def local_copy(manifest: WeightsManifest, requested: str) -> Path:
    """The pipeline directory on this node: the original on the node that holds it, else this
    node's copy of the shipped files (materialised once per node)."""
    import ray

    from workers.tiny_models import _build_lock, default_cache_dir

    if ray.get_runtime_context().get_node_id() == manifest.origin_node and Path(manifest.origin_path).is_dir():
        return Path(manifest.origin_path)
    if not manifest.files:
        raise ModelError(f"model '{requested}' is not on this node and its weights were not shipped to it "
                         "(the node joined after the search started); resume the search")
    final = default_cache_dir() / "shipped" / manifest.digest
    final.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(final.parent / f".{manifest.digest}.lock"):
        if (final / ".complete").is_file():
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{manifest.digest}-", dir=final.parent))
        for name, size, refs in manifest.files:
            path = tmp / name
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as fh:
                for ref in refs:
                    fh.write(ray.get(ref))
            if path.stat().st_size != size:
                raise ModelError(f"shipped weights of model '{requested}' arrived incomplete ({name})")
        (tmp / ".complete").write_text(manifest.digest)
        publish_dir(tmp, final)
    return final
