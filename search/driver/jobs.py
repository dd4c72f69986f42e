"""Creating, resuming and running searches: the steps between the CLI and the driver."""
from __future__ import annotations

from dataclasses import dataclass

from common.clock import utcnow
from common.errors import first_line
from search.config import SearchConfig
from workers.evaluation.protocol import APPLE_RESOLUTION
from search.driver.cluster import driver_id, ensure_ray
from search.driver.driver import SearchDriver
from search.driver.progress import Reporter
from storage import Layer, Search, Storage, StorageError
from storage.records import STALE_AFTER_S
from workers.models import ModelError, ModelSpec, candidate_layers, load_unet, resolve_model, unet_fingerprint


class DuplicateSearch(RuntimeError):
    def __init__(self, existing: Search):
        status = existing.effective_status(utcnow())
        super().__init__(f"an unfinished search {existing.id} ({status}) has the same model and config")
        self.existing = existing


@dataclass(frozen=True)
class Prepared:
    search: Search
    spec: ModelSpec
    created: bool


def resolve_config(spec: ModelSpec, **options) -> SearchConfig:
    """Fill model-dependent defaults (min size, resolution) and validate everything. Apple's
    protocol measures every Hub / local model at 768 px (SDXL too), and the full-architecture
    built-ins (sdxl-arch, sd15-arch); the built-in tiny models keep their own small size."""
    options = {k: v for k, v in options.items() if v is not None}
    options.setdefault("min_size", spec.default_min_size)
    apple = options.get("protocol", "apple") == "apple" and not spec.tiny
    options.setdefault("resolution", APPLE_RESOLUTION if apple else spec.default_resolution)
    return SearchConfig(**options)


def _model_facts(spec: ModelSpec, min_size: int) -> tuple[list[Layer], str]:
    unet = load_unet(spec)
    layers = [Layer(c.name, c.numel, tuple(c.shape), c.kind) for c in candidate_layers(unet, min_size)]
    if not layers:
        raise ModelError(f"model '{spec.requested}' has no Linear/Conv2d weight with more than {min_size} elements; "
                         "lower --min-size")
    return layers, unet_fingerprint(unet)


def prepare_search(storage: Storage, model: str, config: SearchConfig, spec: ModelSpec | None = None,
                   resume_duplicate: bool = False) -> Prepared:
    """Validate everything, then write the search row: bad input never touches the database."""
    spec = spec or resolve_model(model)
    existing = [s for s in storage.find_unfinished(spec.location, config.fingerprint())]
    if existing:
        if not resume_duplicate:
            raise DuplicateSearch(existing[-1])
        return Prepared(existing[-1], spec, False)
    layers, fingerprint = _model_facts(spec, config.min_size)
    search = storage.create_search(
        model=model, model_version=spec.location if spec.source == "hub" else spec.requested,
        model_location=spec.location, model_source=spec.source, fingerprint=fingerprint,
        config=config.to_dict(), config_hash=config.fingerprint(), layers=layers, owner=driver_id())
    return Prepared(search, spec, True)


def prepare_resume(storage: Storage, search_id: str) -> Prepared:
    """Refuse to resume onto a different model: the stored measurements would be meaningless."""
    search = storage.get_search(search_id)
    if search.status == "completed":
        raise StorageError(f"search {search.id} is already completed; nothing to resume")
    spec = resolve_model(search.model)
    _, fingerprint = _model_facts(spec, search.config["min_size"])
    if fingerprint != search.fingerprint:
        raise ModelError(f"model '{search.model}' changed since search {search.id} started (UNet fingerprint differs); "
                         "start a new search")
    return Prepared(search, spec, False)


def run_search(storage: Storage, prepared: Prepared, *, workers: int | None = None, reporter: Reporter | None = None,
               ray_address: str | None = None, actor_resources: dict | None = None) -> tuple[Search, SearchDriver]:
    def stale(s: Search) -> bool:
        now = utcnow()
        return s.effective_status(now) == "interrupted" or (now - (s.heartbeat_at or s.updated_at)).total_seconds() > STALE_AFTER_S

    search = storage.claim(prepared.search.id, driver_id(), stale)
    ensure_ray(ray_address)
    driver = SearchDriver(storage, search, prepared.spec, workers=workers, reporter=reporter,
                          actor_resources=actor_resources)
    return driver.run(), driver


def target_recipe(storage: Storage, search_id: str, *, bits: float | None = None, size_mb: float | None = None,
                  psnr: float | None = None, workers: int | None = 1, reporter: Reporter | None = None,
                  ray_address: str | None = None):
    """Build an optimal recipe for one target from stored measurements, store it, measure it
    end to end (one pipeline run per evaluator start plus one for the recipe)."""
    from search.config import ConfigError
    from search.recipes.tables import load_tables, weight_mse
    from search.recipes.strategy import target_recipe as plan

    search = storage.get_search(search_id)
    config = SearchConfig.from_dict(search.config)
    tables = load_tables(storage, search.id)
    if "original" not in tables.baselines:
        raise ConfigError(f"search {search.id} has no baselines yet; resume it first")
    try:
        planned = plan(config, tables, weight_mse(storage, search.id), bits=bits, size_mb=size_mb, psnr=psnr)
    except ValueError as exc:  # budget too small, unreachable PSNR, missing measurements
        raise ConfigError(first_line(exc)) from None
    spec = resolve_model(search.model)
    ensure_ray(ray_address)
    driver = SearchDriver(storage, search, spec, workers=workers, reporter=reporter)
    key = driver.store_recipe(planned)
    driver.run_recipes([key])
    stored = next(r for r in storage.recipes(search.id) if r.key == key)
    return stored, driver
