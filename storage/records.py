"""Plain, frozen records returned by the storage API (never live ORM objects)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime

from common.formats import PaletteFormat
from common.processes import process_gone

# A running search whose driver stopped beating for this long is shown as interrupted
# (the driver beats every 5 s). MBP_SEARCH_STALE_S shortens it, e.g. for tests.
STALE_AFTER_S = float(os.environ.get("MBP_SEARCH_STALE_S", "60"))

ACTIVE = ("pending", "running", "cancelling")


@dataclass(frozen=True)
class Search:
    id: str
    model: str
    model_version: str
    model_location: str
    model_source: str
    fingerprint: str
    config: dict
    config_hash: str
    status: str
    phase: str
    error: str | None
    owner: str | None
    created_at: datetime
    updated_at: datetime
    heartbeat_at: datetime | None
    finished_at: datetime | None
    evaluations: int
    elapsed_s: float
    request_hash: str | None = None   # model + options as submitted (duplicates while preparing)
    prepare_done: int | None = None   # bytes of weights fetched while preparing
    prepare_total: int | None = None  # bytes to fetch (0: not known yet)
    reused: int = 0                   # results copied from other searches (`evaluations` counts only runs)

    @property
    def prepared(self) -> bool:
        """Its model was fetched, fingerprinted and its candidate layers stored."""
        return bool(self.fingerprint)

    def effective_status(self, now: datetime) -> str:
        """'running' whose driver died (SIGKILL, crash, power loss) is 'interrupted': at once when
        the driver ran on this host and its process is gone (pid and start time), else once its
        heartbeat is STALE_AFTER_S old."""
        return "interrupted" if self.driver_gone(now) else self.status

    def driver_gone(self, now: datetime) -> bool:
        """An active search whose recorded driver can no longer be running (another may take it)."""
        if self.status not in ACTIVE:
            return False
        beat = self.heartbeat_at or self.updated_at
        return (now - beat).total_seconds() > STALE_AFTER_S or process_gone(self.owner)


@dataclass(frozen=True)
class Layer:
    name: str
    numel: int
    shape: tuple[int, ...]
    kind: str


def stored_format(bits: int | None, group_size: int) -> PaletteFormat | None:
    """A row's format: ``group_size`` 0 (every row from before schema v4) is per tensor."""
    return None if bits is None else PaletteFormat(bits, group_size or None)


@dataclass(frozen=True)
class PaletteInfo:
    layer: str
    bits: PaletteFormat  # the palette's format (a per-tensor one equals its int depth)
    digest: str
    weight_mse: float
    path: str
    reuse_key: str | None = None     # storage.measurement_keys.palette_key; None: never reused
    reused_from: str | None = None   # the search that fitted it, when copied from another search


@dataclass(frozen=True)
class Measurement:
    key: str
    phase: str
    bits: PaletteFormat | None  # the format measured (isolated, cumulative); None for the rest
    layer: str | None
    position: int | None
    psnr: float
    per_prompt: tuple[float, ...]
    node: str
    worker: str
    duration_s: float
    reuse_key: str | None = None     # storage.measurement_keys; None: never reused (rows from before keys)
    reuse_device: str | None = None  # device class of the evaluators that measured it (cuda, mps, cpu)
    reused_from: str | None = None   # the search that measured it, when copied from another search


@dataclass(frozen=True)
class Baseline:
    name: str
    psnr: float
    per_prompt: tuple[float, ...]
    node: str
    duration_s: float
    reuse_key: str | None = None     # as Measurement's
    reuse_device: str | None = None
    reused_from: str | None = None


@dataclass(frozen=True)
class StoredRecipe:
    key: str
    strategy: str
    threshold: float | None
    target: dict | None
    bits: dict[str, PaletteFormat]  # every candidate's format (16: float16)
    avg_bits: float
    size_mb: float
    predicted_psnr: float | None
    psnr: float | None
    per_prompt: tuple[float, ...] | None
    node: str | None
    duration_s: float | None


@dataclass(frozen=True)
class Validation:
    recipe_key: str
    mlpackage: str
    size_bytes: int
    avg_bits: float
    structural_ok: bool
    structural_detail: str
    numeric_psnr: float | None
    numeric_ok: bool | None
    runtime: dict | None       # {compute_unit: psnr} where Core ML prediction ran (macOS)
    runtime_note: str          # says plainly when runtime validation was not run, and why
    node: str


@dataclass(frozen=True)
class CoreMLRequest:
    """The Core ML stage asked of a search: recipes ("all" or keys), where it runs, how far it got."""
    search_id: str
    recipes: str
    coreml_node: str
    status: str            # queued, running, completed, failed, interrupted
    error: str | None
    node: str | None
    seconds: float
    updated_at: datetime

    @property
    def keys(self) -> tuple[str, ...] | None:
        """The recipe keys asked for; None: all of the search's recipes."""
        return None if self.recipes == "all" else tuple(self.recipes.split(","))


@dataclass(frozen=True)
class PackageInfo:
    """A recipe's package as stored on the head (status shipped), or why it could not be made."""
    recipe_key: str
    status: str            # shipped | failed
    detail: str
    path: str | None       # relative to the package store root
    size_bytes: int
    sha256: str
    node: str
    ship_s: float


@dataclass(frozen=True)
class BundleInfo:
    """A recipe's Resources folder for Apple's Swift pipeline (`search bundle`)."""
    recipe_key: str
    status: str        # built (a folder on the node that built it) | shipped (a zip on the head) | failed
    detail: str        # the checks' summary, or why it failed
    path: str | None
    total_bytes: int
    sha256: str        # of the shipped zip ("" otherwise)
    options: dict      # BundleOptions as built
    node: str
    seconds: float
    zip_bytes: int = 0  # of the shipped zip (0 otherwise): the head checks it is stored whole
