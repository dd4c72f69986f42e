"""The ``gallery`` phase (issue 31): full images of the float16 model, the 8-bit baseline and every
recipe, for the search's own prompts and seed, made on the evaluators and scored against the
float16 image of the same prompt (PSNR/SSIM with scikit-image on the PNGs as saved).

It runs after the recipes (unless ``--no-gallery``) and for a finished search through
``search images`` / ``POST /searches/{id}/images`` (`SearchDriver.run_gallery`). It is resumable:
every image is stored as it arrives, and an image whose row is stored and whose file is there is
never made again (a pipeline call makes a row's batch of prompts, as the search's own
``--batch-size``; a batch with one image missing is made whole, only the missing one stored, so an
image never depends on what was stored before). The float16 images come first (round one), so
every other image is scored as it arrives; a float16 image made again re-scores the stored images
of its prompt (cheap: no pipeline run). A recipe that palettizes nothing (every layer float16) is
the float16 model: its images are the float16 ones, copied, not made.
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

from common.formats import is_palettized
from search.config import SearchConfig
from search.driver.signals import SearchInterrupted, deferred, stop_on_signals
from storage import Storage
from storage.gallery_store import GalleryFiles, GalleryRecord, GalleryStore, gallery_root
from workers.evaluation.gallery import (DEFAULT_STEPS, LINEAR8, ORIGINAL, GalleryItem, GallerySpec, gallery_seed,
                                        image_metrics)

from workers.model_spec import ModelSpec

PHASE = "gallery"


def default_steps(spec: ModelSpec) -> int:
    """20, or a few-step model's own count (the model card's, `workers.model_spec.HUB_MODELS`)."""
    from workers.model_spec import _SAMPLING

    steps = (_SAMPLING.get(spec.location) or _SAMPLING.get(spec.requested) or (None, None))[0]
    return int(steps) if steps else DEFAULT_STEPS


def gallery_spec(config: SearchConfig, spec: ModelSpec, images: tuple[bytes, ...] = ()) -> GallerySpec:
    """What every image of the search's gallery is: its prompts and seed, the gallery's steps
    (default: `default_steps`) and resolution (default: the model's native one)."""
    from search.config import ConfigError
    from workers.model_spec import IMG2IMG_STRENGTH

    steps = config.gallery_steps or default_steps(spec)
    if spec.img2img and int(steps * IMG2IMG_STRENGTH) < 1:
        raise ConfigError(f"--gallery-steps {steps} denoises nothing at an image-to-image strength of "
                          f"{IMG2IMG_STRENGTH}: give at least {int(round(1 / IMG2IMG_STRENGTH))}")
    return GallerySpec(prompts=tuple(config.prompts), seed=gallery_seed(config.seed, config.protocol),
                       steps=steps,
                       resolution=config.gallery_resolution or spec.default_resolution,
                       guidance_scale=config.guidance_scale, images=tuple(images), batch_size=config.batch_size)


def gallery_rows(storage: Storage, search_id: str) -> list[tuple[str, tuple, bool]]:
    """(row key, palettized assignment, linear8) of every row: original, linear_8bit, the recipes."""
    rows = [(ORIGINAL, (), False), (LINEAR8, (), True)]
    for r in storage.recipes(search_id):
        rows.append((r.key, tuple(sorted((l, b) for l, b in r.bits.items() if is_palettized(b))), False))
    return rows


def stored_images(storage: Storage, search_id: str, files: GalleryFiles) -> dict[tuple[str, int], GalleryRecord]:
    """The stored images whose file is there, by (row, prompt)."""
    return {(r.row, r.prompt): r for r in GalleryStore(storage).images(search_id) if files.path(r.path).is_file()}


def gallery_items(storage: Storage, search_id: str, gspec: GallerySpec, files: GalleryFiles) -> list[GalleryItem]:
    """The pipeline calls still to make (a batch with any image missing), the float16 ones first;
    a row that palettizes nothing copies the float16 images instead (`copies_original`)."""
    done = stored_images(storage, search_id, files)
    return [GalleryItem(f"gallery/{row}/{batch[0]}-{batch[-1]}", row, batch, assignment, linear8)
            for row, assignment, linear8 in gallery_rows(storage, search_id) for batch in gspec.batches()
            if any((row, i) not in done for i in batch)]


def copies_original(item: GalleryItem) -> bool:
    return item.row != ORIGINAL and not item.assignment and not item.linear8


class GalleryPhase:
    """Needs the driver's ``storage``, ``search``, ``config``, ``spec``, ``reporter``, ``pool``,
    ``palette_refs``, ``_load_palettes``, ``_should_stop``, ``_stop``, ``timings`` and
    ``_start_pool`` (the `SearchDriver`)."""

    gallery_made = 0  # images this driver made

    def gallery_files(self) -> GalleryFiles:
        """The service's data directory when the service runs the driver, else next to the database."""
        packages = getattr(self, "packages", None)
        data_dir = Path(packages.root).parent if packages is not None else None
        return GalleryFiles(gallery_root(self.storage.path, data_dir))

    def _phase_gallery(self) -> None:
        if self.config.gallery:
            self.make_gallery(set_phase=True)

    def run_gallery(self) -> int:
        """The gallery of a search whatever its status (`search images`): the pool, the missing
        images, the pool shut down. Returns the number of images made."""
        s = self.storage.get_search(self.search.id)
        phase = "done" if s.status == "completed" else s.phase  # starting the pool says "starting" (even if killed)
        with stop_on_signals(self.request_stop):
            try:
                self._start_pool()
                return self.make_gallery(set_phase=False)
            finally:
                if self.pool:
                    self.pool.shutdown()
                self.storage.update_search(self.search.id, phase=phase)

    def make_gallery(self, set_phase: bool) -> int:
        sid, files = self.search.id, self.gallery_files()
        gspec = gallery_spec(self.config, self.spec, self.config.signal_spec().images if self.config.images else ())
        items = gallery_items(self.storage, sid, gspec, files)
        if set_phase:
            self.storage.update_search(sid, phase=PHASE)
        if not items:
            return 0
        wanted = {pair for it in items for pair in it.assignment}
        self._load_palettes({p for p in wanted if p not in self.palette_refs})
        store = GalleryStore(self.storage)
        originals: dict[int, bytes] = {}
        done = set(stored_images(self.storage, sid, files))

        def submit(actor, item: GalleryItem):
            refs = {key: self.palette_refs[key] for key in item.assignment}
            return actor.gallery_image.remote(item, refs, gspec)

        def keep(item: GalleryItem, made) -> None:
            for prompt, png, sha in zip(made.prompts, made.pngs, made.sha256):
                if (item.row, prompt) in done:
                    continue  # made again only because its batch was: the stored one stays
                if item.row == ORIGINAL:
                    originals[prompt] = png
                rel = files.write(sid, item.row, prompt, png)
                psnr, ssim = (None, 1.0) if item.row == ORIGINAL else image_metrics(
                    self._original_png(files, prompt, originals), png)
                store.add(sid, GalleryRecord(item.row, prompt, rel, sha, psnr, ssim, gspec.steps, gspec.resolution,
                                             made.node, made.duration_s / len(made.prompts)))
                self.gallery_made += 1

        def copy(item: GalleryItem) -> None:  # the float16 model under another name
            from workers.evaluation.gallery import GalleryImages

            pngs = tuple(self._original_png(files, i, originals) for i in item.prompts)
            keep(item, GalleryImages(item.key, item.row, item.prompts, pngs,
                                     tuple(hashlib.sha256(p).hexdigest() for p in pngs), "copied", "", 0.0))

        first = [it for it in items if it.row == ORIGINAL]
        rest = [it for it in items if it.row != ORIGINAL and not copies_original(it)]
        t0 = time.monotonic()
        self.reporter.phase_start(PHASE, len(items))
        try:
            with deferred():
                for batch in (first, rest):
                    for item, image in self.pool.run(batch, submit, self._should_stop):
                        keep(item, image)
                        self.reporter.advance(PHASE)
                    if self._stop.is_set():
                        raise SearchInterrupted(f"search {sid} interrupted")
                    if batch is first:
                        if originals:
                            self._rescore(files, originals)
                        for it in (it for it in items if copies_original(it)):
                            copy(it)
                            self.reporter.advance(PHASE)
        finally:
            self.timings[PHASE] = self.timings.get(PHASE, 0.0) + time.monotonic() - t0
            self.reporter.phase_end(PHASE)
        self.reporter.message(f"gallery: {self.gallery_made} image(s) at {gspec.resolution} px, {gspec.steps} steps, "
                              f"in {time.monotonic() - t0:.1f} s")
        return self.gallery_made

    def _original_png(self, files: GalleryFiles, prompt: int, originals: dict[int, bytes]) -> bytes:
        if prompt not in originals:
            record = stored_images(self.storage, self.search.id, files).get((ORIGINAL, prompt))
            data = files.read(record.path) if record is not None else None
            if data is None:
                raise RuntimeError(f"the float16 gallery image of prompt {prompt} is missing")
            originals[prompt] = data
        return originals[prompt]

    def _rescore(self, files: GalleryFiles, originals: dict[int, bytes]) -> None:
        """Stored images of prompts whose float16 image was just made again: scored against it."""
        store = GalleryStore(self.storage)
        for key, r in stored_images(self.storage, self.search.id, files).items():
            if r.row != ORIGINAL and r.prompt in originals:
                data = files.read(r.path)
                psnr, ssim = image_metrics(originals[r.prompt], data)
                if (psnr, ssim) != (r.psnr, r.ssim):
                    store.add(self.search.id, GalleryRecord(r.row, r.prompt, r.path, r.sha256, psnr, ssim, r.steps,
                                                            r.resolution, r.node, r.duration_s))


__all__ = ["GalleryPhase", "PHASE", "default_steps", "gallery_spec", "gallery_rows", "gallery_items", "stored_images"]
