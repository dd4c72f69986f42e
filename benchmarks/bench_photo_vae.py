"""The photo bench model's VAE: an ``AutoencoderKL`` trained as an autoencoder on the photographs.

``tiny-sdxl``'s VAE is random (8 channels per block): its decodes are texture, so a UNet trained
on its latents makes images that mean nothing (encode/decode of the astronaut photograph: 9.9 dB).
``benchmarks/bench_model.py --photo`` swaps in this one before training the UNet. It is the same
diffusers class with the same four blocks (8x downsampling, 4 latent channels: 64 px images stay
8x8x4 latents, exactly what the UNet's ``sample_size`` 8 and the pipeline's ``vae_scale_factor``
expect), only wider, trained on random crops of the same scikit-image photographs with L1 + L2
reconstruction loss and a tiny KL term, deterministic seeds and a fixed number of steps.

Kept apart from bench_model.py (which stays under ~300 lines) and free of its imports: the caller
passes the images, so this module has no view of the UNet recipe and the UNet recipe none of this one.
"""
from __future__ import annotations

import math

# widened blocks; the rest is tiny-sdxl's VAE config (4 down blocks -> 8x downsampling, 4 latent channels)
VAE_CONFIG = dict(block_out_channels=(16, 32, 64, 128), norm_num_groups=8, layers_per_block=1,
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  latent_channels=4, sample_size=64)
VAE_SEED = 4321
VAE_STEPS = 1200
VAE_BATCH = 16
VAE_LR = 2e-3
VAE_WARMUP = 20
VAE_KL = 1e-6
VAE_VIEWS = 64  # training crops per photograph
VAE_PATCH = 32  # trained on 32 px patches of the 64 px crops: same pixel scale, a quarter of the cost
VAE_HELDOUT = 4  # held-out crops per photograph (another seed), for the reported PSNR


def recipe() -> dict:
    """What the bench model's marker records about this VAE (a change forces a rebuild)."""
    return {"config": {k: list(v) if isinstance(v, tuple) else v for k, v in VAE_CONFIG.items()},
            "seed": VAE_SEED, "steps": VAE_STEPS, "batch": VAE_BATCH, "lr": VAE_LR, "kl": VAE_KL,
            "views": VAE_VIEWS, "patch": VAE_PATCH}


def psnr(a, b) -> float:
    """Mean over images of the PSNR of images in [-1, 1] (peak-to-peak 2)."""
    import torch

    mse = ((a.clamp(-1, 1) - b.clamp(-1, 1)) ** 2).flatten(1).mean(1)
    return float((10 * torch.log10(4.0 / mse)).mean())


def reconstruct(vae, images, batch: int = 64):
    """Decode of the latent mean of each image (what a pipeline's latents decode like)."""
    import torch

    with torch.no_grad():
        return torch.cat([vae.decode(vae.encode(images[i:i + batch]).latent_dist.mean).sample
                          for i in range(0, len(images), batch)])


def train_vae(train_images, heldout_images, log=print):
    """(trained AutoencoderKL in eval mode, summary dict). Call under the bench model's deterministic
    torch settings; the weights are initialised from ``VAE_SEED`` and batches drawn from their own generator."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(VAE_SEED)
    vae = AutoencoderKL(**VAE_CONFIG)
    gen = torch.Generator("cpu").manual_seed(VAE_SEED)
    before = psnr(reconstruct(vae.eval(), heldout_images), heldout_images)
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=VAE_LR, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / VAE_WARMUP) * 0.5 * (1 + math.cos(math.pi * min(s, VAE_STEPS) / VAE_STEPS)))
    log(f"training the photo VAE ({sum(p.numel() for p in vae.parameters()):,} weights) on {len(train_images)} "
        f"crops: {VAE_STEPS} steps of {VAE_BATCH}")
    curve, window = [], []
    for step in range(VAE_STEPS):
        x = train_images[torch.randint(0, len(train_images), (VAE_BATCH,), generator=gen)]
        y, x0 = (int(v) for v in torch.randint(0, x.shape[-1] - VAE_PATCH + 1, (2,), generator=gen))
        x = x[..., y:y + VAE_PATCH, x0:x0 + VAE_PATCH]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        loss = (rec - x).abs().mean() + ((rec - x) ** 2).mean() + VAE_KL * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        window.append(loss.item())
        if len(window) == 25 or step == VAE_STEPS - 1:
            curve.append((step + 1, sum(window) / len(window)))
            window = []
            log(f"  vae step {step + 1}: loss {curve[-1][1]:.4f}")
    from workers.tiny_parts import _round_to_fp16

    _round_to_fp16(vae.eval())  # the saved weights (the fp16 variant is lossless): measure those
    after = psnr(reconstruct(vae, heldout_images), heldout_images)
    log(f"photo VAE: held-out reconstruction PSNR {before:.2f} dB (init) -> {after:.2f} dB "
        f"({len(heldout_images)} crops)")
    return vae, {"vae_loss_curve": curve, "vae_heldout_psnr_before": round(before, 2),
                 "vae_heldout_psnr": round(after, 2), "vae_heldout_crops": len(heldout_images)}
