"""Gallery images: what a recipe does to generated images, beside the float16 model.

The measurements stop at latents; users decide by looking. Gallery images come from *plain*
pipeline calls, as anyone would make them with diffusers (`plain_call_kwargs`): the prompt texts,
the pipeline's own scheduler, ``num_inference_steps`` (default 20, a few-step model's own count),
the model's native resolution, one CPU ``torch.Generator`` per prompt seeded with the search's
seed (Apple's protocol without ``--seed``: ``torch.Generator()``'s default seed), decoded by the
VAE to 8-bit RGB images (``output_type="pil"``). The prompts of a row go through the pipeline in
batches of the search's ``--batch-size`` (0: all in one call; the per-call overhead dominates on
small models): a batch is always made whole, so an image never depends on what was stored
before. A test rebuilds the float16 images with one diffusers call and compares them pixel for
pixel.

Each image is made by an evaluator (`Evaluator.gallery_image`) with a row's weights swapped in
exactly as its end-to-end measurement swaps them: ``original`` (the float16 model), the 8-bit
baseline (``linear8``), or a recipe (its palettes). It returns the PNG bytes; the driver stores
them and scores them against the float16 image of the same prompt (`image_metrics`, scikit-image
on the PNGs as saved, so a user can recompute every number).
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import io
import time
from dataclasses import dataclass

import numpy as np

DEFAULT_STEPS = 20
ORIGINAL, LINEAR8 = "original", "linear_8bit"  # the two rows beside the recipes


@dataclass(frozen=True)
class GallerySpec:
    """How every image of a search's gallery is made (the same for every row)."""

    prompts: tuple[str, ...]
    seed: int
    steps: int = DEFAULT_STEPS
    resolution: int = 0  # pixels, square; 0: the pipeline's default
    guidance_scale: float | None = None  # None: the pipeline's __call__ default
    images: tuple[bytes, ...] = ()  # image-to-image: prompt i gets images[i % len]
    batch_size: int = 0  # prompts per pipeline call; 0: all

    def __post_init__(self):
        if not self.prompts or not all(isinstance(p, str) and p for p in self.prompts):
            raise ValueError("GallerySpec.prompts must be one or more non-empty strings")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"gallery steps must be an integer >= 1, got {self.steps!r}")
        if isinstance(self.resolution, bool) or not isinstance(self.resolution, int) or self.resolution < 0 \
                or self.resolution % 8:
            raise ValueError(f"gallery resolution must be a positive multiple of 8 pixels, got {self.resolution!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 0:
            raise ValueError(f"gallery batch size must be an integer >= 0, got {self.batch_size!r}")


    def batches(self) -> list[tuple[int, ...]]:
        """The prompt indices of each pipeline call."""
        n = len(self.prompts)
        size = self.batch_size or n
        return [tuple(range(start, min(start + size, n))) for start in range(0, n, size)]


@dataclass(frozen=True)
class GalleryItem:
    """One pipeline call to make: row ``row`` (original, linear_8bit or a recipe key), the prompts
    ``prompts`` (one batch). ``phase``/``layer``/``bits`` are there for the pool's failure messages."""

    key: str
    row: str
    prompts: tuple[int, ...]
    assignment: tuple[tuple[str, object], ...] = ()
    linear8: bool = False
    phase: str = "gallery"
    layer: None = None
    bits: None = None


@dataclass(frozen=True)
class GalleryImages:
    """The PNGs of one item, in its prompts' order."""

    key: str
    row: str
    prompts: tuple[int, ...]
    pngs: tuple[bytes, ...]
    sha256: tuple[str, ...]
    node: str
    worker: str
    duration_s: float


def gallery_seed(seed: int | None, protocol: str) -> int:
    """The search's seed: its own, else the protocol's (Apple: ``torch.Generator()``'s default)."""
    if seed is not None:
        return int(seed)
    if protocol == "apple":
        import torch

        return int(torch.Generator().initial_seed())
    return 0


def _params(pipe) -> dict:
    return inspect.signature(pipe.__call__).parameters


def plain_call_kwargs(pipe, spec: GallerySpec, indices: tuple[int, ...]) -> dict:
    """The keyword arguments of the plain pipeline call for the prompts ``indices`` (a test
    writes them out itself)."""
    import torch

    params = _params(pipe)
    kw = dict(prompt=[spec.prompts[i] for i in indices], num_inference_steps=spec.steps,
              generator=[torch.Generator("cpu").manual_seed(spec.seed) for _ in indices], output_type="pil")
    if spec.guidance_scale is not None:
        kw["guidance_scale"] = spec.guidance_scale
    if "Img2Img" in type(pipe).__name__:  # the search's image, at the gallery's size, Apple's strength
        from workers.evaluation.signal import _images
        from workers.model_spec import IMG2IMG_STRENGTH

        res = spec.resolution or _native(pipe)
        images = _images(spec.images, len(spec.prompts), res)
        kw.update(image=[images[i] for i in indices], strength=IMG2IMG_STRENGTH)
    elif spec.resolution:
        kw.update(height=spec.resolution, width=spec.resolution)
    if "use_resolution_binning" in params:
        kw["use_resolution_binning"] = False
    return kw


def _native(pipe) -> int:
    from workers.denoiser import denoiser_of

    sample = denoiser_of(pipe).config.get("sample_size") or getattr(pipe, "default_sample_size", 64)
    sample = sample[0] if isinstance(sample, (list, tuple)) else sample
    return int(sample) * int(getattr(pipe, "vae_scale_factor", 8))


def png_bytes(image) -> bytes:
    """An 8-bit RGB PNG with no metadata (the same pixels give the same bytes)."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def render(pipe, spec: GallerySpec, indices: tuple[int, ...]) -> list[bytes]:
    """The images of the prompts ``indices`` from ``pipe`` as it is now, as PNG bytes."""
    import torch

    vae = getattr(pipe, "vae", None)
    if type(pipe).__name__.startswith(("StableDiffusion3", "Flux")) and vae is not None \
            and vae.config.get("shift_factor", 0.0) is None:
        vae.register_to_config(shift_factor=0.0)  # the built-in tiny SD3 / Flux VAEs have none: decode unshifted
    with torch.no_grad():
        images = pipe(**plain_call_kwargs(pipe, spec, tuple(indices))).images
    return [png_bytes(im) for im in images]


def render_item(evaluator, item: GalleryItem, palettes: dict, spec: GallerySpec) -> GalleryImages:
    """``item``'s images on ``evaluator`` (a `workers.evaluation.evaluator.Evaluator`): its row's
    weights swapped in as the end-to-end measurement of that row swaps them (a full run, the
    pristine weights under ``--default-nbits``), the prefix cache out of the way."""
    from workers.evaluation.items import WorkItem

    t0 = time.perf_counter()
    work = WorkItem(item.key, "baseline", name=item.row, assignment=item.assignment, linear8=item.linear8)
    prefix = evaluator.prefix.detached() if evaluator.prefix is not None else contextlib.nullcontext()
    with evaluator._patched(work, palettes), prefix:
        pngs = tuple(render(evaluator.pipe, spec, item.prompts))
    return GalleryImages(item.key, item.row, item.prompts, pngs, tuple(hashlib.sha256(p).hexdigest() for p in pngs),
                         evaluator.node, evaluator.worker, time.perf_counter() - t0)


def decode_png(data: bytes) -> np.ndarray:
    """A stored PNG as an (h, w, 3) uint8 array."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def image_metrics(reference_png: bytes, png: bytes) -> tuple[float | None, float]:
    """PSNR (dB) and SSIM of ``png`` against the float16 image of the same prompt, with
    scikit-image on the 8-bit images as saved: ``peak_signal_noise_ratio(ref, img)`` (None when the
    images are identical: infinite) and ``structural_similarity(ref, img, channel_axis=-1,
    data_range=255)``."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    ref, img = decode_png(reference_png), decode_png(png)
    if ref.shape != img.shape:
        raise ValueError(f"gallery image shapes differ: {ref.shape} vs {img.shape}")
    ssim = float(structural_similarity(ref, img, channel_axis=-1, data_range=255))
    if np.array_equal(ref, img):
        return None, ssim
    return float(peak_signal_noise_ratio(ref, img)), ssim


__all__ = ["DEFAULT_STEPS", "ORIGINAL", "LINEAR8", "GallerySpec", "GalleryItem", "GalleryImages", "gallery_seed",
           "plain_call_kwargs", "png_bytes", "render", "render_item", "decode_png", "image_metrics"]
