"""``bundle.json``: what a Resources folder holds and how it was made, next to the models.

Every regular file of the folder is listed with its path relative to the folder, its size and its
sha256, so ``sha256sum`` on the user's side checks a download without any tool of ours; the total
is what `search status` and the dashboard show as the bundle's size.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from common.files import atomic_write_text, sha256_of

MANIFEST = "bundle.json"
FORMAT = 1
_SKIP = {MANIFEST, ".bundle-state.json"}


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the bundle folder, '/'-separated
    bytes: int
    sha256: str


@dataclass(frozen=True)
class BundleManifest:
    model: str
    model_version: str
    fingerprint: str
    search_id: str
    recipe_key: str
    family: str  # sd | sdxl | sdxl-refiner | sd3
    formats: dict  # {layer: format spelling}: the recipe
    attention: str
    latent_size: list
    batch: int
    chunked: bool
    encoders_nbits: int | None
    deployment_target: str
    compiled: bool
    palettized_layers: int
    files: list = field(default_factory=list)  # [FileEntry as dict]
    total_bytes: int = 0
    notes: list = field(default_factory=list)  # what was left out, and why
    format: int = FORMAT


def list_files(folder: str | os.PathLike) -> list[FileEntry]:
    """Every regular file under ``folder`` (hidden ones and the manifest excepted), sorted by path."""
    root = Path(folder)
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if not p.is_file() or rel.parts[0].startswith(".") or str(rel) in _SKIP:
            continue
        out.append(FileEntry(rel.as_posix(), p.stat().st_size, sha256_of(p)))
    return out


def write(folder: str | os.PathLike, data: BundleManifest) -> None:
    atomic_write_text(Path(folder) / MANIFEST, json.dumps(asdict(data), indent=1, sort_keys=True))


def read(folder: str | os.PathLike) -> dict:
    """The manifest of a bundle folder as written (a plain dict), or ValueError naming the problem."""
    path = Path(folder) / MANIFEST
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{folder} has no {MANIFEST}: it is not a bundle made by `search bundle`") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"unreadable {path}: {exc}") from None
    if data.get("format") != FORMAT:
        raise ValueError(f"{path} has an unknown format {data.get('format')!r}")
    return data
