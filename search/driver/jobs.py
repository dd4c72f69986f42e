"""Creating, resuming and running searches: the steps between the CLI and the driver."""
from __future__ import annotations

from dataclasses import dataclass

from common.clock import utcnow
from common.errors import first_line
from search.config import SearchConfig
from search.defaults import REFINE_EVALS
from search.driver.cluster import driver_id, ensure_ray
from search.driver.driver import SearchDriver, SearchInterrupted
from search.driver.prepare import PHASE, model_facts, model_version, prepare, request_hash, resolve_config
from search.driver.progress import NullReporter, Reporter
from storage import Search, Storage, StorageError
from workers.models import ModelError, ModelSpec, model_key, model_options, resolve_model


class DuplicateSearch(RuntimeError):
    def __init__(self, existing: Search):
        status = existing.effective_status(utcnow())
        super().__init__(f"an unfinished search {existing.id} ({status}) has the same model and config")
        self.existing = existing


@dataclass(frozen=True)
class Prepared:
    search: Search
    spec: ModelSpec | None  # None: resolved by the driver (a search still preparing)
    created: bool


def submit_search(storage: Storage, model: str, options: dict, spec: ModelSpec | None = None,
                  resume_duplicate: bool = False) -> Prepared:
    """Store a search to be prepared by its driver (no weights are loaded here) and return at
    once, or the unfinished search with the same model and options (``resume_duplicate``; else
    DuplicateSearch). ``model`` must pass `model_key`; with ``spec`` (the local command line
    resolves it first) the configuration is resolved and stored now too."""
    key = model_key(model)
    rhash = request_hash(key, options)
    existing = storage.find_unfinished_request(rhash)
    config = resolve_config(spec, **options) if spec is not None else None
    if config is not None:
        existing += [s for s in storage.find_unfinished(spec.location, config.fingerprint())
                     if s.id not in {e.id for e in existing}]
    if existing:
        existing.sort(key=lambda s: s.created_at)
        if not resume_duplicate:
            raise DuplicateSearch(existing[-1])
        return Prepared(existing[-1], spec, False)
    search = storage.create_search(
        model=model, model_version=model, model_location=spec.location if spec else key,
        model_source=spec.source if spec else "", fingerprint="", layers=[], owner=driver_id(),
        config=config.to_dict() if config else options, config_hash=config.fingerprint() if config else rhash,
        request_hash=rhash, phase=PHASE)
    return Prepared(search, spec, True)


def prepare_search(storage: Storage, model: str, config: SearchConfig, spec: ModelSpec | None = None,
                   resume_duplicate: bool = False) -> Prepared:
    """Validate everything, then write the search row: bad input never touches the database."""
    spec = spec or resolve_model(model)
    existing = [s for s in storage.find_unfinished(spec.location, config.fingerprint())]
    if existing:
        if not resume_duplicate:
            raise DuplicateSearch(existing[-1])
        return Prepared(existing[-1], spec, False)
    layers, fingerprint = model_facts(spec, config.min_size)
    search = storage.create_search(
        model=model, model_version=model_version(spec),
        model_location=spec.location, model_source=spec.source, fingerprint=fingerprint,
        config=config.to_dict(), config_hash=config.fingerprint(), layers=layers, owner=driver_id())
    return Prepared(search, spec, True)


def prepare_resume(storage: Storage, search_id: str) -> Prepared:
    """Refuse to resume onto a different model: the stored measurements would be meaningless."""
    search = storage.get_search(search_id)
    if search.status == "completed":
        raise StorageError(f"search {search.id} is already completed; nothing to resume")
    if not search.prepared:  # its driver prepares it (and checks for duplicates then)
        return Prepared(search, None, False)
    spec = resolve_model(search.model, **model_options(search.config))
    _, fingerprint = model_facts(spec, search.config["min_size"])
    if fingerprint != search.fingerprint:
        raise ModelError(f"model '{search.model}' changed since search {search.id} started (denoiser fingerprint differs); "
                         "start a new search")
    return Prepared(search, spec, False)


def run_search(storage: Storage, prepared: Prepared, *, workers: int | None = None, reporter: Reporter | None = None,
               ray_address: str | None = None, actor_resources: dict | None = None,
               packages=None) -> tuple[Search, SearchDriver]:
    """Prepare (if needed) and run a search; ``packages``: the `PackageStore` its ``coreml`` phase
    ships to (None: next to the database)."""
    search = storage.claim(prepared.search.id, driver_id(), lambda s: s.driver_gone(utcnow()))
    spec, root = prepared.spec, None
    try:
        if not search.prepared:
            search, spec, root = prepare(storage, search, spec, reporter or NullReporter())
        ensure_ray(ray_address)
    except KeyboardInterrupt:  # Ctrl-C / SIGTERM before the driver took over (search.driver.signals)
        storage.update_search(search.id, status="interrupted")
        raise SearchInterrupted(f"search {search.id} interrupted") from None
    driver = SearchDriver(storage, search, spec, workers=workers, reporter=reporter,
                          actor_resources=actor_resources, weights_dir=root)
    driver.packages = packages
    return driver.run(), driver


def target_recipe(storage: Storage, search_id: str, *, bits: float | None = None, size_mb: float | None = None,
                  psnr: float | None = None, workers: int | None = 1, reporter: Reporter | None = None,
                  ray_address: str | None = None, refine_evals: int | None = None):
    """Build an optimal recipe for one target from stored measurements, store it, measure it
    end to end (one pipeline run per evaluator start plus one for the recipe); then, for a size
    target with ``refine_evals`` > 0 (default REFINE_EVALS), refine it with end-to-end
    measurements and return the best measured recipe. Returns (stored recipe, driver, Refined or None)."""
    from search.config import ConfigError
    from search.recipes.tables import load_tables, weight_mse
    from search.recipes.strategy import target_recipe as plan

    search = storage.get_search(search_id)
    tables = load_tables(storage, search.id)
    if "original" not in tables.baselines:  # before the config: a search still preparing stores its raw options
        raise ConfigError(f"search {search.id} has no baselines yet; resume it first")
    config = SearchConfig.from_dict(search.config)
    try:
        planned = plan(config, tables, weight_mse(storage, search.id), bits=bits, size_mb=size_mb, psnr=psnr)
    except ValueError as exc:  # budget too small, unreachable PSNR, missing measurements
        raise ConfigError(first_line(exc)) from None
    spec = resolve_model(search.model, **model_options(search.config))
    ensure_ray(ray_address)
    driver = SearchDriver(storage, search, spec, workers=workers, reporter=reporter)
    evals = REFINE_EVALS if refine_evals is None else refine_evals
    if evals < 0:
        raise ConfigError(f"--refine-evals must be 0 (one-shot) or more, got {evals}")
    key = driver.store_recipe(planned)
    refined = None
    if evals > 0 and psnr is None:
        from search.driver.refinement import refine_target

        key, refined = driver.run_recipes([key], then=lambda: refine_target(
            driver, config, weight_mse(storage, search.id), planned, evals, max_avg_bits=bits, max_size_mb=size_mb))
    else:
        driver.run_recipes([key])
    stored = next(r for r in storage.recipes(search.id) if r.key == key)
    return stored, driver, refined
