"""A bench model whose UNet weights come from real training: ``tiny-sdxl`` trained on photographs.

    python benchmarks/bench_model.py [--rebuild]      # builds once (3-6 min on 2 CPU cores), prints the path
    python benchmarks/bench_model.py --base tiny-sd   # the SD-1.x-shaped one (Core AI exports SD 1.x, not SDXL)

The random-weight built-in models are fine for plumbing but flatter the optimal strategy: their
weights are i.i.d. draws from the init distribution, so palettization errors of different layers
behave like independent noise, exactly what its additive model assumes. Trained weights put
structure into the errors. This module takes ``tiny-sdxl`` (same architecture, text encoders, VAE, tokenizers)
and trains its UNet with the standard epsilon-prediction denoising loss on VAE latents of the
real photographs shipped with scikit-image (astronaut, coffee, chelsea, rocket, camera, ...),
random-cropped, resized to 64 px and flipped by a seeded generator, each conditioned on a
short caption through the pipeline's own two text encoders (captions encoded once, 10 % of
the samples unconditional so classifier-free guidance means something).

The random VAE's latent means have a standard deviation of ~0.2, so its ``scaling_factor`` is
set to 1/std of the training latents (exactly how SD's 0.18215 was chosen); the UNet then
learns on unit-variance latents instead of near-zero ones. Only the UNet and that VAE config
value differ from ``tiny-sdxl``.

Deterministic: fixed seeds, one torch thread, ``torch.use_deterministic_algorithms``, a fixed
number of steps (not a time budget). Weights are rounded to float16 before saving (the fp16
variant is lossless) and the directory is written with ``save_pretrained`` into
``<cache>/bench/tiny-sdxl-trained`` (``MBP_SEARCH_CACHE`` / the user cache dir): a temporary
sibling renamed into place with ``os.replace``, with a marker file recording the recipe
version, so it is built once and rebuilt only when missing or outdated. It loads as a local
pipeline directory: ``search submit --model <dir> --min-size 8192``.

``--base tiny-sd`` trains ``tiny-sd`` (SD-1.5-shaped: one text encoder, no pooled embeddings or
``time_ids``) the same way into ``<cache>/bench/tiny-sd-trained``, because Apple's Core AI exporter
has no SDXL pipeline (benchmarks/coreai_vs_4bit.py); the SDXL build is unchanged (marker, bytes).

``--photo`` (``<cache>/bench/tiny-sdxl-photo``, with ``--base tiny-sd``: ``tiny-sd-photo``) first trains
a wider VAE as an autoencoder on the same photographs (benchmarks/bench_photo_vae.py; the random one
decodes everything to texture), then the UNet exactly as above on that VAE's latents. Its marker adds
the VAE recipe; the two UNet-only models keep theirs byte for byte. About 11 min on 2 shared cores.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.files import publish_dir  # noqa: E402
from workers.tiny_models import (TINY_RESOLUTION, _build_lock, _round_to_fp16, default_cache_dir,  # noqa: E402
                                 ensure_tiny_model, quiet_hf)
from workers.tiny_models import FORMAT_VERSION as TINY_FORMAT  # noqa: E402

NAME = "tiny-sdxl-trained"
BASE = "tiny-sdxl"
TRAINED = {BASE: NAME, "tiny-sd": "tiny-sd-trained"}  # base model -> the bench model's directory name
PHOTO = {BASE: "tiny-sdxl-photo", "tiny-sd": "tiny-sd-photo"}  # --photo: its VAE trained too (bench_photo_vae)
BENCH_VERSION = "1"  # bump when the training recipe changes: forces a rebuild
MARKER = ".mbp-bench-model"
MIN_SIZE = 8192  # pass as --min-size: a local directory otherwise gets the 1e5 default of real models

SEED = 1234
STEPS = 900
BATCH = 16
LR = 1e-3
WARMUP = 50
VIEWS_PER_IMAGE = 48
UNCOND_P = 0.1
LOG_EVERY = 50

# (skimage.data loader, caption): real photographs only, all shipped with scikit-image (no download).
PHOTOS = (
    ("astronaut", "a portrait photo of a woman in a white space suit"),
    ("coffee", "a photo of a cup of coffee on a red table"),
    ("chelsea", "a photo of a small cat sitting in a room"),
    ("rocket", "a photo of a white rocket under a blue sky"),
    ("camera", "a black and white photo of a man with a camera"),
    ("brick", "a black and white photo of an old brick wall"),
    ("clock", "a black and white photo of a clock on a table"),
    ("coins", "a black and white photo of old coins"),
    ("grass", "a black and white photo of grass"),
    ("gravel", "a black and white photo of gravel on a road"),
    ("hubble_deep_field", "a photo of the night sky with stars"),
    ("immunohistochemistry", "a photo of cells under a microscope"),
    ("moon", "a black and white photo of the moon"),
    ("page", "a black and white photo of a page of old text"),
    ("retina", "a photo of the red retina of an eye"),
    ("stereo_motorcycle", "a photo of a red motorcycle in a room"),
)


def bench_dir(cache_dir: Path | None = None, base: str = BASE, photo: bool = False) -> Path:
    root = Path(cache_dir if cache_dir is not None else default_cache_dir()).expanduser()
    return root / "bench" / (PHOTO if photo else TRAINED)[base]


def _marker_text(base: str = BASE, photo: bool = False) -> str:
    marker = {"name": TRAINED[base], "version": BENCH_VERSION, "base": base, "base_format": TINY_FORMAT,
              "seed": SEED, "steps": STEPS, "batch": BATCH, "lr": LR}
    if photo:  # the two UNet-only models' markers stay byte for byte what their caches carry
        from benchmarks.bench_photo_vae import recipe
        marker.update(name=PHOTO[base], vae=recipe())
    return json.dumps(marker)


def _is_current(path: Path, base: str = BASE, photo: bool = False) -> bool:
    try:
        return (path / MARKER).read_text() == _marker_text(base, photo)
    except OSError:
        return False


def ensure_bench_model(cache_dir: Path | None = None, *, rebuild: bool = False, log=print, base: str = BASE,
                       photo: bool = False) -> Path:
    """The trained bench pipeline directory of ``base`` (tiny-sdxl or tiny-sd), built deterministically once;
    ``photo``: with a VAE trained on the photographs too (images that mean something)."""
    if base not in TRAINED:
        raise ValueError(f"no bench model for {base!r}; choose one of {tuple(TRAINED)}")
    final, name = bench_dir(cache_dir, base, photo), (PHOTO if photo else TRAINED)[base]
    if not rebuild and _is_current(final, base, photo):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(final.parent / f".{name}.lock"):
        if not rebuild and _is_current(final, base, photo):
            return final
        base_dir = ensure_tiny_model(base, cache_dir)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=final.parent))
        try:
            shutil.copytree(base_dir, tmp, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns(".mbp-tiny-model", "unet", "vae"))
            with quiet_hf():
                summary = _train_into(base_dir, tmp, log, base, photo)
            (tmp / "training.json").write_text(json.dumps(summary, indent=2))
            (tmp / MARKER).write_text(_marker_text(base, photo))
            publish_dir(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


@contextlib.contextmanager
def _deterministic_torch():
    """One thread, deterministic algorithms, forked RNG; everything restored afterwards."""
    import torch

    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    warn = torch.is_deterministic_algorithms_warn_only_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.set_num_threads(1)
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.manual_seed(SEED)
        try:
            yield
        finally:
            torch.set_num_threads(threads)
            torch.use_deterministic_algorithms(det, warn_only=warn)


def _load_photo(name: str):
    """HxWx3 float32 in [-1, 1] (grayscale replicated; stereo pairs: the left view)."""
    import numpy as np
    import skimage.data

    img = getattr(skimage.data, name)()
    img = img[0] if isinstance(img, tuple) else img
    img = np.asarray(img)
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    img = img[..., :3].astype(np.float32)
    return img / (255.0 if img.max() > 1.0 else 1.0) * 2.0 - 1.0


def _views(gen, n_views: int, size: int = TINY_RESOLUTION):
    """(len(PHOTOS) * n_views, 3, size, size) random crops (50-100 % of the short side), antialiased
    resize, random horizontal flips; labels are photo indices."""
    import torch
    import torch.nn.functional as F

    out, labels = [], []
    for i, (name, _) in enumerate(PHOTOS):
        img = torch.from_numpy(_load_photo(name)).permute(2, 0, 1)[None]
        H, W = img.shape[-2:]
        short = min(H, W)
        for _ in range(n_views):
            side = int(short * (0.5 + 0.5 * torch.rand((), generator=gen).item()))
            y = int(torch.randint(0, H - side + 1, (), generator=gen))
            x = int(torch.randint(0, W - side + 1, (), generator=gen))
            crop = F.interpolate(img[..., y:y + side, x:x + side], size=(size, size), mode="bilinear",
                                 antialias=True, align_corners=False)
            if torch.rand((), generator=gen).item() < 0.5:
                crop = crop.flip(-1)
            out.append(crop)
            labels.append(i)
    return torch.cat(out).clamp(-1, 1), torch.tensor(labels)


def _train_into(base: Path, out_dir: Path, log, base_name: str = BASE, photo: bool = False) -> dict:
    import torch
    from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    t_start = time.monotonic()
    xl = base_name == BASE  # SDXL: two encoders, pooled embeddings and time_ids; SD 1.x: one encoder only
    with _deterministic_torch():
        cls = StableDiffusionXLPipeline if xl else StableDiffusionPipeline
        pipe = cls.from_pretrained(base, dtype=torch.float32, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        unet, vae = pipe.unet, pipe.vae
        vae_info = {}
        if photo:  # the VAE first, from its own seeds: the UNet's data and draws below are unchanged
            from benchmarks import bench_photo_vae as pv
            train = _views(torch.Generator("cpu").manual_seed(pv.VAE_SEED + 1), pv.VAE_VIEWS)[0]
            heldout = _views(torch.Generator("cpu").manual_seed(pv.VAE_SEED + 2), pv.VAE_HELDOUT)[0]
            vae, vae_info = pv.train_vae(train, heldout, log)
            pipe.vae = vae
        gen = torch.Generator("cpu").manual_seed(SEED)

        # data: VAE latent means of augmented views, scaled to unit variance
        images, labels = _views(gen, VIEWS_PER_IMAGE)
        with torch.no_grad():
            means = torch.cat([vae.encode(images[i:i + 64]).latent_dist.mean for i in range(0, len(images), 64)])
        std = float(means.std())
        scaling = float(f"{1.0 / std:.4g}")
        latents = means * scaling
        vae.register_to_config(scaling_factor=scaling)

        # conditioning: every caption and the empty prompt, encoded once by the pipeline's encoders
        captions = [c for _, c in PHOTOS] + [""]
        with torch.no_grad():
            if xl:
                pe, _, pooled, _ = pipe.encode_prompt(prompt=captions, device="cpu", num_images_per_prompt=1,
                                                      do_classifier_free_guidance=False)
                pe, pooled = pe.float(), pooled.float()
            else:
                pe = pipe.encode_prompt(prompt=captions, device="cpu", num_images_per_prompt=1,
                                        do_classifier_free_guidance=False)[0].float()
        uncond = len(captions) - 1
        time_ids = torch.tensor([[TINY_RESOLUTION, TINY_RESOLUTION, 0, 0, TINY_RESOLUTION, TINY_RESOLUTION]],
                                dtype=torch.float32)
        ddpm = DDPMScheduler.from_config(pipe.scheduler.config)
        abar = ddpm.alphas_cumprod.float()
        T = len(abar)

        def loss_of(idx, t, noise, cond):
            x0 = latents[idx]
            a = abar[t].view(-1, 1, 1, 1)
            xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
            if not xl:
                return torch.mean((unet(xt, t, pe[cond]).sample - noise) ** 2)
            pred = unet(xt, t, pe[cond], added_cond_kwargs={"text_embeds": pooled[cond],
                                                           "time_ids": time_ids.expand(len(idx), -1)}).sample
            return torch.mean((pred - noise) ** 2)

        # a fixed probe batch (same latents, noise, timesteps) measured before and after training
        pg = torch.Generator("cpu").manual_seed(SEED + 1)
        probe_idx = torch.randperm(len(latents), generator=pg)[:64]
        probe = (probe_idx, torch.randint(0, T, (64,), generator=pg),
                 torch.randn(64, *latents.shape[1:], generator=pg), labels[probe_idx])
        unet.eval()
        with torch.no_grad():
            probe_before = float(loss_of(*probe))

        unet.train()
        opt = torch.optim.AdamW(unet.parameters(), lr=LR, weight_decay=1e-2)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / WARMUP) * 0.5 * (1 + math.cos(math.pi * min(s, STEPS) / STEPS)))
        curve, window = [], []
        log(f"training {base_name}'s UNet on {len(PHOTOS)} scikit-image photographs ({len(latents)} views, "
            f"{STEPS} steps of {BATCH}, latent scaling {scaling})")
        for step in range(STEPS):
            idx = torch.randint(0, len(latents), (BATCH,), generator=gen)
            t = torch.randint(0, T, (BATCH,), generator=gen)
            noise = torch.randn(BATCH, *latents.shape[1:], generator=gen)
            drop = torch.rand(BATCH, generator=gen) < UNCOND_P
            cond = torch.where(drop, torch.full_like(labels[idx], uncond), labels[idx])
            loss = loss_of(idx, t, noise, cond)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            opt.step()
            sched.step()
            window.append(loss.item())
            if len(window) == LOG_EVERY or step == STEPS - 1:
                curve.append((step + 1, sum(window) / len(window)))
                window = []
        unet.eval()
        _round_to_fp16(unet)
        with torch.no_grad():
            probe_after = float(loss_of(*probe))

        for name, module in (("unet", unet), ("vae", vae)):
            module.save_pretrained(out_dir / name, safe_serialization=True)
            module.to(torch.float16).save_pretrained(out_dir / name, safe_serialization=True, variant="fp16")
    seconds = time.monotonic() - t_start
    log("loss curve (mean per %d steps): " % LOG_EVERY + ", ".join(f"{s}:{v:.3f}" for s, v in curve))
    log(f"loss first {curve[0][1]:.3f} -> last {curve[-1][1]:.3f}; fixed probe batch {probe_before:.3f} -> "
        f"{probe_after:.3f} (fp16-rounded weights); built in {seconds:.0f} s")
    return {"name": (PHOTO if photo else TRAINED)[base_name], "version": BENCH_VERSION,
            "photos": [p for p, _ in PHOTOS], "views": len(latents),
            "steps": STEPS, "batch": BATCH, "lr": LR, "seed": SEED, "latent_scaling": scaling,
            "loss_curve": curve, "probe_loss_before": probe_before, "probe_loss_after": probe_after,
            "build_seconds": round(seconds, 1), **vae_info}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rebuild", action="store_true", help="build again even if the cached copy is current")
    ap.add_argument("--base", choices=tuple(TRAINED), default=BASE,
                    help="the built-in model whose UNet is trained (tiny-sd: SD-1.x-shaped, for Core AI)")
    ap.add_argument("--photo", action="store_true",
                    help="train a VAE on the photographs too (<cache>/bench/tiny-sdxl-photo: images with content)")
    args = ap.parse_args(argv)
    path = ensure_bench_model(rebuild=args.rebuild, base=args.base, photo=args.photo)
    info = json.loads((path / "training.json").read_text())
    print(f"{path}\n  loss {info['loss_curve'][0][1]:.3f} -> {info['loss_curve'][-1][1]:.3f}, probe "
          f"{info['probe_loss_before']:.3f} -> {info['probe_loss_after']:.3f}; search it with: "
          f"search submit --model {path} --min-size {MIN_SIZE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
