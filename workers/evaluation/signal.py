"""The measurement signal: fixed prompts, seed and steps through the real pipeline, compared by PSNR.

The text encoders never change during a search (only denoiser weights are palettized), so their
embeddings are computed once (`ENCODE_OUTPUTS` maps each family's ``encode_prompt`` results to
its ``__call__`` keywords) and every run goes through the pipeline's own ``__call__`` with
them: the denoiser and scheduler run exactly as the pipeline runs them. Initial latents of the
(n, channels, h, w) kind are drawn once on the CPU, so every device starts from the same noise:
under Apple's protocol exactly as the pipeline draws them from Apple's generator
(``torch.Generator()`` with its default seed, in the embeddings' dtype), under the classic one
from ``--seed``. Pipelines whose latents depend on more than the noise (image-to-image: the VAE
encoding of the image; Flux: packed latents) draw them themselves from that same generator,
restored before every run, as Apple's ``run_pipe`` lets every pipeline do.

Image-to-image pipelines (Apple's rule: "Img2Img" in the class name) get Apple's call: the
images (one per prompt, resized to the resolution with LANCZOS), no height/width, and
``strength=0.25`` (with the 4 steps `ModelSpec.default_steps` gives them).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
import torch

from workers.denoiser import denoiser_of
from workers.evaluation.protocol import CLASSIC_PROMPTS, check_protocol, default_prompts
from workers.model_spec import IMG2IMG_STRENGTH

DEFAULT_PROMPTS = CLASSIC_PROMPTS  # the classic protocol's prompts (tests and examples use them)
# What a pipeline's encode_prompt returns, as the __call__ keywords each output is passed under
# (None: not passed), by class-name prefix (first match wins; "" is SD 1.x/2.x and LCM).
_XL_LIKE = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
ENCODE_OUTPUTS = (
    ("StableDiffusionXL", _XL_LIKE),
    ("StableDiffusion3", _XL_LIKE),
    ("Flux", ("prompt_embeds", "pooled_prompt_embeds", None)),
    ("PixArt", ("prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds", "negative_prompt_attention_mask")),
    ("", ("prompt_embeds", "negative_prompt_embeds")),
)


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
    images: tuple[bytes, ...] = ()  # image-to-image: encoded image files, prompt i gets images[i % len]

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
        if not all(isinstance(i, bytes) and i for i in self.images):
            raise ValueError("SignalSpec.images must be the bytes of image files")
        object.__setattr__(self, "images", tuple(self.images))


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
        config = denoiser_of(pipe).config
        scale = int(getattr(pipe, "vae_scale_factor", 8))
        sample = config.get("sample_size") or getattr(pipe, "default_sample_size", None)
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
        self.cfg = self.guidance_scale > 1 and config.get("time_cond_proj_dim") is None
        self.img2img = "Img2Img" in type(pipe).__name__  # Apple's rule
        n = len(spec.prompts)
        self.batch = spec.batch_size or n
        self.images = _images(spec.images, n, res) if self.img2img else None
        if self.img2img and not self.images:
            raise ValueError(f"{type(pipe).__name__} is an image-to-image pipeline: it needs images")
        with torch.no_grad():
            self.embeds = self._encode(list(spec.prompts))
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
        self.latents = None  # drawn by the pipeline from the restored generator
        if not self.img2img and not hasattr(pipe, "_pack_latents"):
            shape = (n, config.in_channels, res // scale, res // scale)
            self.latents = torch.randn(shape, generator=gen, dtype=dtype)
        self._gen_state = gen.get_state()
        self.before_call = None  # optional callback(call index) before each pipeline call (prefix reuse)

    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The pipeline's own encode_prompt, called with the keywords it takes; Apple's protocol
        gives explicit empty negative prompts."""
        params = inspect.signature(self.pipe.encode_prompt).parameters
        kw = dict(prompt=prompts, prompt_2=None, prompt_3=None, device=self.device, num_images_per_prompt=1,
                  do_classifier_free_guidance=self.cfg, negative_prompt=[""] * len(prompts),
                  clean_caption=_call_default(self.pipe, "clean_caption"))
        outputs = self.pipe.encode_prompt(**{k: v for k, v in kw.items() if k in params})
        names = next(names for prefix, names in ENCODE_OUTPUTS if type(self.pipe).__name__.startswith(prefix))
        out = dict(zip(names, outputs))
        return {k: v for k, v in out.items()
                if k is not None and v is not None and (self.cfg or "negative" not in k)}

    def call_kwargs(self, start: int, stop: int) -> dict:
        """Keyword arguments of the pipeline call for prompts[start:stop] (minus embeddings)."""
        kw = dict(num_inference_steps=self.spec.steps, guidance_scale=self.guidance_scale,
                  height=self.resolution, width=self.resolution, output_type="latent",
                  generator=self._generator())
        params = inspect.signature(self.pipe.__call__).parameters
        if "use_resolution_binning" in params:
            kw["use_resolution_binning"] = False  # PixArt: measure at the resolution asked (native: unchanged)
        if _call_default(self.pipe, "negative_prompt") is not None:
            kw["negative_prompt"] = None  # encoded already (PixArt's default "" would clash with the embeddings)
        if self.latents is not None:
            kw["latents"] = self.latents[start:stop].to(self.device, self._latent_dtype())
        if self.img2img:  # Apple's image-to-image call: the images, no height/width, strength 0.25
            del kw["height"], kw["width"]
            kw.update(image=self.images[start:stop], strength=IMG2IMG_STRENGTH)
        return kw

    def _latent_dtype(self) -> torch.dtype:
        return self.latents.dtype if self.spec.protocol == "apple" else denoiser_of(self.pipe).dtype

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


def _images(data: tuple[bytes, ...], n: int, resolution: int) -> list:
    """Prompt i's image: images[i % len], RGB, resized to resolution² with LANCZOS (Apple's)."""
    import io

    from PIL import Image

    if not data:
        return []
    decoded = [Image.open(io.BytesIO(d)).convert("RGB").resize((resolution, resolution), Image.LANCZOS)
               for d in data]
    return [decoded[i % len(decoded)] for i in range(n)]


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
