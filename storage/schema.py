"""SQLAlchemy 2 ORM tables. Only `storage/` imports this module."""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from common.clock import utcnow


class Base(DeclarativeBase):
    pass


class SearchRow(Base):
    __tablename__ = "searches"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    model: Mapped[str] = mapped_column(Text)            # as the user typed it
    model_version: Mapped[str] = mapped_column(Text)    # resolved Hub id or path
    model_location: Mapped[str] = mapped_column(Text)   # where weights were loaded from
    model_source: Mapped[str] = mapped_column(String(16))
    fingerprint: Mapped[str] = mapped_column(String(64))
    config_json: Mapped[str] = mapped_column(Text)
    config_hash: Mapped[str] = mapped_column(String(64), index=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    phase: Mapped[str] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    owner: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    heartbeat_at: Mapped[datetime | None] = mapped_column(nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True)
    evaluations: Mapped[int] = mapped_column(Integer, default=0)   # pipeline runs performed
    elapsed_s: Mapped[float] = mapped_column(Float, default=0.0)    # driver wall time, all attempts
    # schema v3: a search exists before its model is fetched (phase "preparing", fingerprint "")
    request_hash: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)  # model + options
    prepare_done: Mapped[int | None] = mapped_column(Integer, nullable=True)   # bytes of weights fetched
    prepare_total: Mapped[int | None] = mapped_column(Integer, nullable=True)  # bytes to fetch (0: unknown)
    reused: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # results copied (docs/reuse.md)


class LayerRow(Base):
    __tablename__ = "layers"
    __table_args__ = (UniqueConstraint("search_id", "name"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    search_id: Mapped[str] = mapped_column(ForeignKey("searches.id", ondelete="CASCADE"), index=True)
    ordinal: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(String(8))
    numel: Mapped[int] = mapped_column(Integer)
    shape_json: Mapped[str] = mapped_column(Text)


class PaletteRow(Base):
    __tablename__ = "palettes"
    __table_args__ = (UniqueConstraint("search_id", "layer", "bits", "group_size"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    search_id: Mapped[str] = mapped_column(ForeignKey("searches.id", ondelete="CASCADE"), index=True)
    layer: Mapped[str] = mapped_column(Text)
    bits: Mapped[int] = mapped_column(Integer)
    group_size: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # v4; 0: per tensor
    digest: Mapped[str] = mapped_column(String(64))
    weight_mse: Mapped[float] = mapped_column(Float)
    path: Mapped[str] = mapped_column(Text)  # relative to the palette store root
    reuse_key: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)  # storage.measurement_keys
    reused_from: Mapped[str | None] = mapped_column(String(64), nullable=True)  # the search that fitted it


class MeasurementRow(Base):
    __tablename__ = "measurements"
    __table_args__ = (UniqueConstraint("search_id", "key"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    search_id: Mapped[str] = mapped_column(ForeignKey("searches.id", ondelete="CASCADE"), index=True)
    key: Mapped[str] = mapped_column(Text)
    phase: Mapped[str] = mapped_column(String(16))
    bits: Mapped[int | None] = mapped_column(Integer, nullable=True)
    group_size: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # v4; 0: per tensor
    layer: Mapped[str | None] = mapped_column(Text, nullable=True)
    position: Mapped[int | None] = mapped_column(Integer, nullable=True)
    psnr: Mapped[float] = mapped_column(Float)
    per_prompt_json: Mapped[str] = mapped_column(Text)
    node: Mapped[str] = mapped_column(Text)
    worker: Mapped[str] = mapped_column(Text)
    duration_s: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    reuse_key: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)  # storage.measurement_keys
    reuse_device: Mapped[str | None] = mapped_column(String(64), nullable=True)  # cuda, mps, cpu
    reused_from: Mapped[str | None] = mapped_column(String(64), nullable=True)  # the search that measured it


class BaselineRow(Base):
    __tablename__ = "baselines"
    __table_args__ = (UniqueConstraint("search_id", "name"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    search_id: Mapped[str] = mapped_column(ForeignKey("searches.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(32))
    psnr: Mapped[float] = mapped_column(Float)
    per_prompt_json: Mapped[str] = mapped_column(Text)
    node: Mapped[str] = mapped_column(Text)
    duration_s: Mapped[float] = mapped_column(Float)
    reuse_key: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)  # storage.measurement_keys
    reuse_device: Mapped[str | None] = mapped_column(String(64), nullable=True)
    reused_from: Mapped[str | None] = mapped_column(String(64), nullable=True)


class RecipeRow(Base):
    __tablename__ = "recipes"
    __table_args__ = (UniqueConstraint("search_id", "key"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    search_id: Mapped[str] = mapped_column(ForeignKey("searches.id", ondelete="CASCADE"), index=True)
    key: Mapped[str] = mapped_column(Text)
    strategy: Mapped[str] = mapped_column(String(16))
    threshold: Mapped[float | None] = mapped_column(Float, nullable=True)
    target_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    bits_json: Mapped[str] = mapped_column(Text)
    avg_bits: Mapped[float] = mapped_column(Float)
    size_mb: Mapped[float] = mapped_column(Float)
    predicted_psnr: Mapped[float | None] = mapped_column(Float, nullable=True)
    psnr: Mapped[float | None] = mapped_column(Float, nullable=True)
    per_prompt_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    node: Mapped[str | None] = mapped_column(Text, nullable=True)
    duration_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


V1_TABLES = [SearchRow, LayerRow, PaletteRow, MeasurementRow, BaselineRow, RecipeRow]


class ValidationRow(Base):
    """Result of applying a recipe to a Core ML model and checking it (schema v2)."""

    __tablename__ = "validations"
    __table_args__ = (UniqueConstraint("search_id", "recipe_key"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    search_id: Mapped[str] = mapped_column(ForeignKey("searches.id", ondelete="CASCADE"), index=True)
    recipe_key: Mapped[str] = mapped_column(Text)
    mlpackage: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(Integer)
    avg_bits: Mapped[float] = mapped_column(Float)
    structural_ok: Mapped[bool] = mapped_column()
    structural_detail: Mapped[str] = mapped_column(Text)
    numeric_psnr: Mapped[float | None] = mapped_column(Float, nullable=True)
    numeric_ok: Mapped[bool | None] = mapped_column(nullable=True)
    runtime_json: Mapped[str | None] = mapped_column(Text, nullable=True)  # {compute_unit: psnr} on macOS
    runtime_note: Mapped[str] = mapped_column(Text)
    node: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


V2_TABLES = [ValidationRow]


class CoreMLJobRow(Base):
    """The Core ML stage asked of a search (schema v5): which recipes, where, and how far it got."""

    __tablename__ = "coreml_jobs"
    __table_args__ = (UniqueConstraint("search_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    search_id: Mapped[str] = mapped_column(ForeignKey("searches.id", ondelete="CASCADE"), index=True)
    recipes: Mapped[str] = mapped_column(Text)          # "all" or comma-separated recipe keys
    coreml_node: Mapped[str] = mapped_column(String(16))  # "coreml" | "any"
    status: Mapped[str] = mapped_column(String(16))     # queued, running, completed, failed, interrupted
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    node: Mapped[str | None] = mapped_column(Text, nullable=True)   # host of the Core ML worker
    seconds: Mapped[float] = mapped_column(Float, default=0.0)      # wall time, all attempts
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)    # also the heartbeat while running


class CoreMLPackageRow(Base):
    """One recipe's package shipped to the head (schema v5), or why it could not be made."""

    __tablename__ = "coreml_packages"
    __table_args__ = (UniqueConstraint("search_id", "recipe_key"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    search_id: Mapped[str] = mapped_column(ForeignKey("searches.id", ondelete="CASCADE"), index=True)
    recipe_key: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))    # shipped | failed
    detail: Mapped[str] = mapped_column(Text)          # why it failed ("" when shipped)
    path: Mapped[str | None] = mapped_column(Text, nullable=True)   # zip, relative to the package store root
    size_bytes: Mapped[int] = mapped_column(Integer, default=0)
    sha256: Mapped[str] = mapped_column(String(64), default="")
    node: Mapped[str] = mapped_column(Text)
    ship_s: Mapped[float] = mapped_column(Float, default=0.0)     # seconds to ship the zip to the head
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


V5_TABLES = [CoreMLJobRow, CoreMLPackageRow]


class BundleRow(Base):
    """A Resources folder built for a recipe (schema v6): where it is, how big, how it checked."""

    __tablename__ = "coreml_bundles"
    __table_args__ = (UniqueConstraint("search_id", "recipe_key"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    search_id: Mapped[str] = mapped_column(ForeignKey("searches.id", ondelete="CASCADE"), index=True)
    recipe_key: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))    # built | shipped | failed
    detail: Mapped[str] = mapped_column(Text)          # checks, or why it failed
    path: Mapped[str | None] = mapped_column(Text, nullable=True)   # the folder (local) or zip (shipped)
    total_bytes: Mapped[int] = mapped_column(Integer, default=0)   # the folder's files (bundle.json's total)
    sha256: Mapped[str] = mapped_column(String(64), default="")    # of the zip, when shipped
    zip_bytes: Mapped[int] = mapped_column(Integer, default=0)     # of the zip, when shipped
    options_json: Mapped[str] = mapped_column(Text)    # BundleOptions as built
    node: Mapped[str] = mapped_column(Text)
    seconds: Mapped[float] = mapped_column(Float, default=0.0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


V6_TABLES = [BundleRow]


class GalleryImageRow(Base):
    """One gallery image (issue 31): a row (original, linear_8bit or a recipe key) × prompt, its PNG
    (relative to the gallery root), sha256 and PSNR/SSIM against the float16 image of that prompt."""

    __tablename__ = "gallery_images"
    __table_args__ = (UniqueConstraint("search_id", "row_key", "prompt"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    search_id: Mapped[str] = mapped_column(ForeignKey("searches.id", ondelete="CASCADE"), index=True)
    row_key: Mapped[str] = mapped_column(Text)
    prompt: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    psnr: Mapped[float | None] = mapped_column(Float, nullable=True)   # None: identical to the float16 image
    ssim: Mapped[float] = mapped_column(Float)
    steps: Mapped[int] = mapped_column(Integer)
    resolution: Mapped[int] = mapped_column(Integer)
    node: Mapped[str] = mapped_column(Text)
    duration_s: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


GALLERY_TABLES = [GalleryImageRow]


class CoreAIBundleRow(Base):
    """A Core AI folder built for a recipe (issue 36): where it is, its checks on the Linux Core AI
    runtime, and the comparison with Apple's 4bit preset (JSON: rows of name, bits/weight, asset
    bytes, PSNR; delta dB)."""

    __tablename__ = "coreai_bundles"
    __table_args__ = (UniqueConstraint("search_id", "recipe_key"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    search_id: Mapped[str] = mapped_column(ForeignKey("searches.id", ondelete="CASCADE"), index=True)
    recipe_key: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))    # built | shipped | failed
    detail: Mapped[str] = mapped_column(Text)          # the checks in one line, or why it failed
    path: Mapped[str | None] = mapped_column(Text, nullable=True)   # the folder (local) or zip (shipped)
    total_bytes: Mapped[int] = mapped_column(Integer, default=0)   # the folder's files
    sha256: Mapped[str] = mapped_column(String(64), default="")    # of the zip, when shipped
    zip_bytes: Mapped[int] = mapped_column(Integer, default=0)     # of the zip, when shipped
    luts_ok: Mapped[bool | None] = mapped_column(nullable=True)
    luts_detail: Mapped[str] = mapped_column(Text, default="")
    runtime_psnr: Mapped[float | None] = mapped_column(Float, nullable=True)
    measured_psnr: Mapped[float | None] = mapped_column(Float, nullable=True)
    runtime_ok: Mapped[bool | None] = mapped_column(nullable=True)
    runtime_detail: Mapped[str] = mapped_column(Text, default="")
    comparison_json: Mapped[str | None] = mapped_column(Text, nullable=True)  # None: not compared
    node: Mapped[str] = mapped_column(Text, default="")
    seconds: Mapped[float] = mapped_column(Float, default=0.0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # the runtime's float16 floor (Apple's none preset on it), when the runtime check measured it
    floor_psnr: Mapped[float | None] = mapped_column(Float, nullable=True)


COREAI_TABLES = [CoreAIBundleRow]


class CoreMLJobTargetRow(Base):
    """What a search's queued Core ML phase builds (issue 36 through the service: `search apply ID
    --target coreai --server URL` on a search submitted for Core ML): coreml or coreai. Its own
    table so the job row keeps its shape; no row: the search's own target (its config)."""

    __tablename__ = "coreml_job_targets"
    __table_args__ = (UniqueConstraint("search_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    search_id: Mapped[str] = mapped_column(ForeignKey("searches.id", ondelete="CASCADE"), index=True)
    target: Mapped[str] = mapped_column(String(16))    # coreml | coreai
    compare_4bit: Mapped[bool] = mapped_column(default=True)  # coreai: also measure Apple's 4bit preset
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


JOB_TARGET_TABLES = [CoreMLJobTargetRow]
