"""A search's `preparing` phase, run by its own driver: a submit only stores the request (model
name checked without the network, options validated) and returns its id; the driver then
resolves the model (the Hub, for a Hub id), fetches its weights with byte progress (the reporter's
``preparing`` bar in MB, and the database's ``prepare_done``/``prepare_total`` for `status` and
`list`), lists the candidate layers, fingerprints the denoiser and stores them (`Storage.set_prepared`).

A search still preparing has fingerprint "" and no layers. Duplicates are recognised before the
fingerprint exists by the request's hash (model identity + options: `request_hash`), and once the
model is resolved by its location and configuration, as for searches of earlier releases.
Failures (unknown or gated model, no network, no candidates) end the search ``failed`` with the
usual one-line message.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from common.clock import utcnow
from common.errors import first_line
from search.config import ConfigError, SearchConfig
from search.driver.driver import SearchFailed, SearchInterrupted
from search.driver.progress import Reporter
from storage import Layer, Search, Storage
from workers.models import (ModelError, ModelSpec, candidate_layers, denoiser_fingerprint, load_denoiser, model_options,
                            resolve_model)

PHASE = "preparing"
PROGRESS_EVERY_S = 1.0
_TUPLES = ("nbits", "prompts", "strategy", "targets", "anchors")


class PrepareFailed(SearchFailed):
    """The search was marked failed (message: its stored one-line error)."""


class PrepareStopped(SearchInterrupted):
    """The search was cancelled or interrupted while preparing (its status is stored)."""


def request_hash(model_key: str, options: dict) -> str:
    """Identity of a submission before its model is known: model identity + parsed options."""
    body = json.dumps({"model": model_key, "options": options}, sort_keys=True, default=list)
    return hashlib.sha256(body.encode()).hexdigest()


def resolve_config(spec: ModelSpec, **options) -> SearchConfig:
    """Fill model-dependent defaults (min size, resolution, steps, guidance, an image-to-image
    pipeline's images) and validate everything. Apple's protocol measures every Hub / local UNet
    model at 768 px (SDXL and the refiner too) and a transformer denoiser at its native size;
    the built-in tiny models keep their own small size (`ModelSpec.protocol_resolution`)."""
    from workers.evaluation.images import search_images

    options = {k: (tuple(v) if k in _TUPLES and isinstance(v, list) else v) for k, v in options.items()
               if v is not None}
    options.setdefault("min_size", spec.default_min_size)
    apple = options.get("protocol", "apple") == "apple"
    options.setdefault("resolution", spec.protocol_resolution if apple else spec.default_resolution)
    options.setdefault("steps", spec.default_steps)
    if spec.default_guidance is not None:
        options.setdefault("guidance_scale", spec.default_guidance)
    images_dir = options.pop("images_dir", None)
    if "images" not in options:  # a stored config already holds its images' digests
        try:
            options["images"] = search_images(spec.img2img, images_dir)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    return SearchConfig(**options)


def model_version(spec: ModelSpec) -> str:
    """What the recipes' JSON says was searched: the Hub id, the name given, or for a single file its
    name, sha256 and LoRAs (`workers.single_file.version_line`)."""
    return spec.version or (spec.location if spec.source == "hub" else spec.requested)


def model_facts(spec: ModelSpec, min_size: int) -> tuple[list[Layer], str]:
    denoiser = load_denoiser(spec)
    layers = [Layer(c.name, c.numel, tuple(c.shape), c.kind) for c in candidate_layers(denoiser, min_size)]
    if not layers:
        raise ModelError(f"model '{spec.requested}' has no Linear/Conv2d weight with more than {min_size} elements; "
                         "lower --min-size")
    return layers, denoiser_fingerprint(denoiser)


class _Progress:
    """Bytes fetched -> the reporter's bar (MB) and the database (at most every PROGRESS_EVERY_S,
    which is also the heartbeat); a cancel request stops the preparation."""

    def __init__(self, storage: Storage, sid: str, reporter: Reporter):
        self.storage, self.sid, self.reporter = storage, sid, reporter
        self.total_mb: int | None = None
        self.shown_mb = 0
        self.last = 0.0

    def __call__(self, done: int, total: int) -> None:
        if self.total_mb is None:
            self.total_mb = max(1, round(total / 1e6))
            self.reporter.phase_start(PHASE, self.total_mb)
        mb = min(round(done / 1e6), self.total_mb)
        if mb > self.shown_mb:
            self.reporter.advance(PHASE, mb - self.shown_mb)
            self.shown_mb = mb
        if time.monotonic() - self.last >= PROGRESS_EVERY_S or done >= total > 0:
            self.last = time.monotonic()
            self.storage.set_prepare_progress(self.sid, done, total)
            if self.storage.get_search(self.sid).status == "cancelling":
                raise PrepareStopped("cancelled")


def prepare(storage: Storage, search: Search, spec: ModelSpec | None, reporter: Reporter) -> tuple[Search, ModelSpec, Path]:
    """Resolve, fetch, fingerprint and store the facts of a search still preparing; returns the
    prepared search, its model spec and the local pipeline directory."""
    from workers.weights import fetch_pipeline

    sid, started = search.id, time.monotonic()
    storage.update_search(sid, phase=PHASE)
    progress = _Progress(storage, sid, reporter)
    try:
        reporter.message(f"preparing search {sid}: model {search.model}")
        spec = spec or resolve_model(search.model, **model_options(search.config))
        config = resolve_config(spec, **search.config)
        others = [s for s in storage.find_unfinished(spec.location, config.fingerprint()) if s.id != sid]
        if others:
            status = others[-1].effective_status(utcnow())
            raise ConfigError(f"an unfinished search {others[-1].id} ({status}) has the same model and config; "
                              f"resume it: search resume {others[-1].id}")
        root = fetch_pipeline(spec, progress)
        reporter.phase_end(PHASE)
        layers, fingerprint = model_facts(spec, config.min_size)
    except PrepareStopped:
        storage.update_search(sid, status="cancelled", add_elapsed=time.monotonic() - started)
        raise
    except KeyboardInterrupt:
        storage.update_search(sid, status="interrupted", add_elapsed=time.monotonic() - started)
        raise PrepareStopped("interrupted") from None
    except Exception as exc:
        msg = first_line(exc)
        storage.update_search(sid, status="failed", error=msg, add_elapsed=time.monotonic() - started)
        raise PrepareFailed(msg) from None
    prepared = storage.set_prepared(
        sid, model_version=model_version(spec), model_location=spec.location,
        model_source=spec.source, fingerprint=fingerprint, config=config.to_dict(),
        config_hash=config.fingerprint(), layers=layers)
    storage.update_search(sid, phase="setup", add_elapsed=time.monotonic() - started)
    reporter.message(f"model ready: {len(layers)} candidate layers of its {spec.denoiser}, "
                     f"fingerprint {fingerprint[:12]}")
    return prepared, spec, root


__all__ = ["PHASE", "PrepareFailed", "PrepareStopped", "model_facts", "model_version", "prepare", "request_hash",
           "resolve_config"]
