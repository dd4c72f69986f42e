"""The measurement signal: fixed prompts, seed and steps through the real pipeline, compared by PSNR.

The text encoders never change during a search (only UNet weights are palettized), so their
embeddings are computed once and every run goes through the pipeline's own ``__call__`` with
``prompt_embeds``: the UNet and scheduler run exactly as the pipeline runs them, and nothing
else is recomputed. Initial latents are drawn once on the CPU, so every device starts from the
same noise: under Apple's protocol exactly as the pipeline draws them from Apple's generator
(``torch.Generator()`` with its default seed, in the embeddings' dtype), under the classic one
from ``--seed``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
import torch

from workers.evaluation.protocol import CLASSIC_PROMPTS, check_protocol, default_prompts

DEFAULT_PROMPTS = CLASSIC_PROMPTS  # the classic protocol's prompts (tests and examples use them)


@dataclass(frozen=True)
class SignalSpec:
    """What one measurement is: the protocol (see `workers.evaluation.protocol`), prompts,
    noise, steps and size. Empty prompts / no seed mean the protocol's own."""

    prompts: tuple[str, ...] = ()
    seed: int | None = None  # apple: None -> torch.Generator()'s default seed; classic: None -> 0
    protocol: str = "apple"
    steps: int = 1
    resolution: int = 0  # pixels, square; 0 -> the pipeline's default size
    guidance_scale: float | None = None  # None -> the pipeline's __call__ default
    batch_size: int = 0  # prompts per pipeline call; 0 -> all prompts in one call

    def __post_init__(self):
        prompts = self.prompts
        if isinstance(prompts, str):
            raise ValueError("SignalSpec.prompts must be a sequence of strings, not one string")
        check_protocol(self.protocol)
        prompts = tuple(prompts) or default_prompts(self.protocol)
        object.__setattr__(self, "prompts", prompts)
        if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise ValueError("SignalSpec.prompts must be one or more non-empty strings")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"SignalSpec.seed must be a non-negative integer, got {self.seed!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"SignalSpec.steps must be an integer >= 1, got {self.steps!r}")
        res = self.resolution
        if isinstance(res, bool) or not isinstance(res, int) or res < 0 or res % 8:
            raise ValueError(f"SignalSpec.resolution must be a positive multiple of 8 pixels "
                             f"(or 0 for the model default), got {res!r}")
        if self.guidance_scale is not None and not np.isfinite(self.guidance_scale):
            raise ValueError(f"SignalSpec.guidance_scale must be finite, got {self.guidance_scale!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) \
                or self.batch_size < 0:
            raise ValueError(f"SignalSpec.batch_size must be an integer >= 0, got {self.batch_size!r}")


def _call_default(pipe, name: str):
    param = inspect.signature(pipe.__call__).parameters.get(name)
    return None if param is None or param.default is inspect.Parameter.empty else param.default


class SignalRunner:
    """Runs the pipeline with cached prompt embeddings (text encoders run once, here).

    ``pipe`` must already be on ``device``. After construction the text encoders are no longer
    used, so a memory-tight worker may move them off the accelerator.
    """

    def __init__(self, pipe, spec: SignalSpec, device: str):
        self.pipe, self.spec, self.device = pipe, spec, torch.device(device)
        scale = int(getattr(pipe, "vae_scale_factor", 8))
        sample = pipe.unet.config.sample_size
        sample = sample[0] if isinstance(sample, (list, tuple)) else sample
        res = spec.resolution or int(sample) * scale
        if res <= 0 or res % scale:
            raise ValueError(f"resolution {res} is not a positive multiple of the VAE scale "
                             f"factor {scale}")
        self.resolution = res
        gs = spec.guidance_scale if spec.guidance_scale is not None else \
            _call_default(pipe, "guidance_scale")
        self.guidance_scale = float(gs if gs is not None else 1.0)
        # Same rule as the pipelines' do_classifier_free_guidance property.
        self.cfg = self.guidance_scale > 1 and pipe.unet.config.time_cond_proj_dim is None
        self.sdxl = "pooled_prompt_embeds" in inspect.signature(pipe.__call__).parameters
        n = len(spec.prompts)
        self.batch = spec.batch_size or n
        with torch.no_grad():
            self.embeds = self._encode(list(spec.prompts))
        shape = (n, pipe.unet.config.in_channels, res // scale, res // scale)
        gen = torch.Generator("cpu")
        if spec.protocol == "apple":
            # What the pipeline does with Apple's generator: one randn of the whole batch on the
            # CPU in the prompt embeddings' dtype. The generator's state after that draw is what
            # the scheduler would see next, so every run gets a generator restored to it.
            if spec.seed is not None:
                gen.manual_seed(spec.seed)
            dtype = self.embeds["prompt_embeds"].dtype
        else:
            gen.manual_seed(spec.seed or 0)
            dtype = torch.float32
        self.latents = torch.randn(shape, generator=gen, dtype=dtype)
        self._gen_state = gen.get_state()
        self.before_call = None  # optional callback(call index) before each pipeline call (prefix reuse)

    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        negative = [""] * len(prompts)  # Apple's protocol: explicit empty negative prompts
        if self.sdxl:
            pe, ne, pp, npp = self.pipe.encode_prompt(
                prompt=prompts, device=self.device, num_images_per_prompt=1,
                do_classifier_free_guidance=self.cfg, negative_prompt=negative)
            out = dict(prompt_embeds=pe, negative_prompt_embeds=ne,
                       pooled_prompt_embeds=pp, negative_pooled_prompt_embeds=npp)
        else:
            pe, ne = self.pipe.encode_prompt(prompts, self.device, 1, self.cfg, negative)
            out = dict(prompt_embeds=pe, negative_prompt_embeds=ne)
        return {k: v for k, v in out.items() if v is not None and (self.cfg or "negative" not in k)}

    def call_kwargs(self, start: int, stop: int) -> dict:
        """Keyword arguments of the pipeline call for prompts[start:stop] (minus embeddings)."""
        return dict(
            num_inference_steps=self.spec.steps, guidance_scale=self.guidance_scale,
            height=self.resolution, width=self.resolution, output_type="latent",
            latents=self.latents[start:stop].to(self.device, self._latent_dtype()),
            generator=self._generator(),
        )

    def _latent_dtype(self) -> torch.dtype:
        return self.latents.dtype if self.spec.protocol == "apple" else self.pipe.unet.dtype

    def _generator(self) -> torch.Generator:
        gen = torch.Generator("cpu")
        if self.spec.protocol == "apple":
            gen.set_state(self._gen_state)
        else:
            gen.manual_seed(self.spec.seed or 0)
        return gen

    @torch.no_grad()
    def run(self) -> torch.Tensor:
        """Denoised latents, float32 on CPU, shape (num_prompts, C, h, w), prompt order."""
        outs = []
        for call, start in enumerate(range(0, len(self.spec.prompts), self.batch)):
            stop = min(start + self.batch, len(self.spec.prompts))
            if self.before_call is not None:
                self.before_call(call)
            embeds = {k: v[start:stop] for k, v in self.embeds.items()}
            result = self.pipe(**embeds, **self.call_kwargs(start, stop))
            outs.append(result.images.detach().to("cpu", torch.float32))
        return torch.cat(outs)


def psnr(ref, test) -> np.ndarray:
    """Per-prompt PSNR (first axis) in dB, with Apple's epsilons; float64."""
    ref = _as_f64(ref)
    test = _as_f64(test)
    if ref.shape != test.shape:
        raise ValueError(f"psnr: shapes differ {ref.shape} vs {test.shape}")
    ref = ref.reshape(ref.shape[0], -1)
    test = test.reshape(test.shape[0], -1)
    peak = np.abs(ref).max(axis=1) + 1e-5
    rmse = np.sqrt(np.mean((ref - test) ** 2, axis=1))
    return 20 * np.log10(peak / (rmse + 1e-10))


def _as_f64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    x = np.asarray(x, dtype=np.float64)
    return x[None] if x.ndim == 0 else x
