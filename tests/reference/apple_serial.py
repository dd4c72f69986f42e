"""A plain, serial re-implementation of Apple's mixed-bit palettization pre-analysis.

Written from a reading of ``apple/ml-stable-diffusion``'s
``python_coreml_stable_diffusion/mixed_bit_compression_pre_analysis.py`` (and ``compute_psnr``
in ``torch2coreml.py``); see ``APPLE_PROTOCOL.md`` next to this file for every detail and the
few deviations this environment forces. It is a test oracle: it imports nothing from this
project (only torch, numpy, diffusers, coremltools), does one thing at a time in the order
Apple does it, and favours obviousness over speed.

Entry point: :func:`run_apple_pre_analysis` (a pipeline directory + the protocol parameters →
a dict in Apple's JSON shape). The building blocks (:func:`compute_psnr`, :func:`round_psnr`,
:func:`fake_int8_linear`, :func:`kmeans_palettize_array`, :func:`candidate_layers`,
:func:`descending_psnr_order`, :func:`recipe_thresholds`, :func:`build_recipe`) are public so
tests can check them one by one.
"""

from __future__ import annotations

import copy
import logging
import time
import warnings
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

# Apple's constants (mixed_bit_compression_pre_analysis.py)
APPLE_NBITS = (1, 2, 4, 6, 8)
APPLE_MIN_SIZE = 1e5  # PALETTIZE_MIN_SIZE
APPLE_RESOLUTION = 768  # TEST_RESOLUTION
APPLE_NUM_RECIPES = 7
APPLE_PROMPTS = (  # RANDOM_TEST_DATA, verbatim
    "a black and brown dog standing outside a door.",
    "a person on a motorcycle makes a turn on the track.",
    "inflatable boats sit on the arizona river, and on the bank",
    "a white cat sitting under a white umbrella",
    "black bear standing in a field of grass under a tree.",
    "a train that is parked on tracks and has graffiti writing on it, with a mountain range "
    "in the background.",
    "a cake inside of a pan sitting in an oven.",
    "a table with paper plates and flowers in a home",
)
ALLOWED_BITS = (1, 2, 4, 6, 8)
UNCOMPRESSED_BITS = 16
# coremltools sends fp16 tensors with at least this many elements to kmeans1d, others to sklearn
COREMLTOOLS_KMEANS1D_MIN_NUMEL = 10_000


# --------------------------------------------------------------------------- the metric

def compute_psnr(ref: np.ndarray, test: np.ndarray, dtype=None) -> float:
    """Apple's ``compute_psnr(a=ref, b=test)``: the peak comes from the *test* array.

    ``20*log10((max|test| + 1e-5) / (sqrt(mean((ref - test)^2)) + 1e-10))``, computed in the
    arrays' own dtype like Apple's numpy code (or in ``dtype`` if given, e.g. ``np.float64``).
    """
    a = np.asarray(ref)
    b = np.asarray(test)
    if dtype is not None:
        a = a.astype(dtype)
        b = b.astype(dtype)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {a.shape} vs {b.shape}")
    peak = np.abs(b).max()
    diff = a - b
    mean_sq = (diff * diff).sum() / b.size
    rms = np.sqrt(mean_sq)
    return float(20 * np.log10((peak + 1e-5) / (rms + 1e-10)))


def round_psnr(value: float) -> float:
    """Apple rounds each per-prompt PSNR with ``float(f"{x:.1f}")`` (correct rounding, ties even)."""
    return float(format(value, ".1f"))


def per_prompt_psnr(ref_out: np.ndarray, test_out: np.ndarray, dtype=None) -> list[float]:
    """Rounded PSNR for each prompt (axis 0 of the latents batch)."""
    if len(ref_out) != len(test_out):
        raise ValueError("reference and test batches differ in length")
    return [round_psnr(compute_psnr(r, t, dtype)) for r, t in zip(ref_out, test_out)]


def mean_of(values: Sequence[float]) -> float:
    """Apple's averaging: Python ``sum`` in list order divided by the count."""
    return sum(values) / len(values)


# --------------------------------------------------------------------------- weight transforms

def fake_int8_linear(weight: np.ndarray, dtype=np.float16) -> np.ndarray:
    """Apple's ``fake_linear_quantize`` with its defaults (axis=-1, mode LINEAR, int8).

    Because ``axis=-1`` never equals a non-negative axis index, the min/max are taken over the
    WHOLE tensor (per-tensor quantization). The range is widened to contain 0; q in [-128, 127].
    The arithmetic runs in ``dtype`` (Apple's weights are fp16; ``None`` keeps the input's dtype).
    Returns the dequantized array in that dtype.
    """
    w = np.asarray(weight)
    if dtype is not None:
        w = w.astype(dtype)
    lo = np.minimum(w.min(), 0)          # scalar of w's dtype
    hi = np.maximum(w.max(), 0)
    span = hi - lo
    q_lo, q_hi = -128, 127
    zero_point = np.round((q_lo * hi - q_hi * lo) / span)
    zero_point = np.clip(zero_point, q_lo, q_hi).astype(np.int8)
    scale = (span / (q_hi - q_lo)).astype(w.dtype)
    q = np.round(w * (q_hi - q_lo) / span) + zero_point
    q = np.clip(q, q_lo, q_hi).astype(np.int8)
    return (q.astype(w.dtype) - zero_point.astype(w.dtype)) * scale


def kmeans_palettize_array(weight_fp16: np.ndarray, nbits: int, small_tensor_kmeans: str = "auto"):
    """coremltools' k-means LUT exactly as Apple's ``fake_palettize`` calls it.

    Returns ``(lut_fp16, indices_uint8, forced)``; the palettized tensor is
    ``lut_fp16[indices].reshape(weight.shape)``. Apple calls
    ``_get_kmeans_lookup_table_and_weight(nbits, fp16_array)`` with nothing else: fp16 tensors of
    >= 10,000 elements go to coremltools' vendored kmeans1d, smaller ones to scikit-learn.
    ``small_tensor_kmeans``: "auto" = Apple's call, retried with ``force_kmeans1d=True`` only if
    scikit-learn is missing (``forced`` is then True); "kmeans1d" = always force kmeans1d;
    "coremltools" = Apple's call, no fallback.
    """
    from coremltools.models.neural_network.quantization_utils import (
        _get_kmeans_lookup_table_and_weight)

    val = np.asarray(weight_fp16)
    if val.dtype != np.float16:
        raise TypeError("Apple palettizes the fp16 values: pass a float16 array")
    small = val.size < COREMLTOOLS_KMEANS1D_MIN_NUMEL
    with warnings.catch_warnings():  # sklearn warns when a tensor has fewer distinct values than 2^n
        warnings.simplefilter("ignore")
        return _kmeans(_get_kmeans_lookup_table_and_weight, val, nbits, small, small_tensor_kmeans)


def _kmeans(fit, val, nbits, small, small_tensor_kmeans):
    forced = False
    if small_tensor_kmeans == "kmeans1d":
        lut, idx = fit(nbits, val, force_kmeans1d=True)
        forced = small
    elif small_tensor_kmeans in ("auto", "coremltools"):
        try:
            lut, idx = fit(nbits, val)
        except ModuleNotFoundError:
            if small_tensor_kmeans == "coremltools":
                raise
            lut, idx = fit(nbits, val, force_kmeans1d=True)
            forced = True
    else:
        raise ValueError(f"small_tensor_kmeans must be auto|kmeans1d|coremltools, "
                         f"not {small_tensor_kmeans!r}")
    lut = np.asarray(lut).reshape(-1).astype(np.float16)
    idx = np.asarray(idx).reshape(-1).astype(np.uint8)
    return lut, idx, forced


class Palettizer:
    """Apple's ``fake_palettize`` with a memo of the k-means results.

    The LUT and indices are a deterministic function of (fp16 bytes, shape, nbits, mode): Apple
    re-fits the same layer from the same weights in the isolated pass, the cumulative pass and
    the recipe measurements, so the memo changes no value, only the time. ``forced`` lists the
    (layer, nbits, numel) that had to fall back to kmeans1d because scikit-learn is missing.
    """

    def __init__(self, small_tensor_kmeans: str = "auto", memo: bool = True):
        self.mode = small_tensor_kmeans
        self.memo: dict | None = {} if memo else None
        self.forced: list = []
        self.fits = 0
        self.seconds = 0.0

    def lut_indices(self, val: np.ndarray, nbits: int, name: str = ""):
        key = None
        if self.memo is not None:
            key = (int(nbits), val.shape, val.tobytes())
            if key in self.memo:
                return self.memo[key]
        start = time.perf_counter()
        lut, idx, forced = kmeans_palettize_array(val, nbits, self.mode)
        self.seconds += time.perf_counter() - start
        self.fits += 1
        if forced:
            self.forced.append((name, int(nbits), int(val.size)))
        if key is not None:
            self.memo[key] = (lut, idx)
        return lut, idx

    def __call__(self, module: nn.Module, nbits: int, name: str = "") -> torch.Tensor:
        """Replace ``module.weight`` by ``lut[indices]``; return the weight to restore, which (as
        in Apple's code) is the fp16-cast original in the module's dtype."""
        dtype = module.weight.data.dtype
        device = module.weight.data.device
        val = module.weight.data.detach().cpu().numpy().astype(np.float16)
        lut, idx = self.lut_indices(val, nbits, name)
        module.weight.data = torch.from_numpy(lut[idx].reshape(val.shape)).to(dtype).to(device)
        return torch.from_numpy(val).to(dtype)


def restore_weight(module: nn.Module, value: torch.Tensor) -> None:
    module.weight.data = value.to(module.weight.data.device)


def modules_with_weight(unet: nn.Module):
    """``named_modules()`` entries with a ``weight`` attribute (Apple's ``hasattr`` test); a
    ``weight`` that is None (norms without affine) is skipped — Apple's code would crash there."""
    for name, module in unet.named_modules():
        if hasattr(module, "weight") and isinstance(getattr(module, "weight"), torch.Tensor):
            yield name, module


def fake_int8_unet(unet: nn.Module, dtype=np.float16) -> int:
    """Apple's ``fake_int8_quantize``: every module with a weight, norms included."""
    count = 0
    for _, module in modules_with_weight(unet):
        w = module.weight.data
        new = fake_int8_linear(w.detach().cpu().numpy(), dtype)
        module.weight.data = torch.from_numpy(np.ascontiguousarray(new)).to(w.dtype).to(w.device)
        count += 1
    return count


def palettize_every_weight(unet: nn.Module, nbits: int, palettize: Palettizer) -> int:
    """Apple's ``fake_nbits_palette`` (used for ``--default-nbits``)."""
    count = 0
    for name, module in modules_with_weight(unet):
        palettize(module, nbits, name)
        count += 1
    return count


def apply_recipe(unet: nn.Module, recipe: dict[str, int], palettize: Palettizer) -> None:
    """Apple's ``fake_palette_from_recipe``: palettize each named module whose bits are not 16."""
    seen = set()
    for name, module in modules_with_weight(unet):
        if name in recipe:
            bits = recipe[name]
            if bits not in ALLOWED_BITS + (UNCOMPRESSED_BITS,):
                raise ValueError(f"{name}: {bits} bits is not allowed")
            seen.add(name)
            if bits != UNCOMPRESSED_BITS:
                palettize(module, bits, name)
    missing = set(recipe) - seen
    if missing:  # Apple silently ignores these; a test oracle should not
        raise KeyError(f"recipe names modules not in the UNet: {sorted(missing)[:5]}")


# --------------------------------------------------------------------------- analysis pieces

def candidate_layers(unet: nn.Module, min_size: float) -> list[tuple[str, int]]:
    """Apple's ``get_palettizable_modules``: Linear/Conv2d with ``weight.numel() > min_size``."""
    return [(name, int(m.weight.numel())) for name, m in unet.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and m.weight.numel() > min_size]


def descending_psnr_order(single_layer: dict[str, list[float]]) -> list[str]:
    """Apple's ``descending_psnr_order``: stable sort by ``-sum(per-prompt values)``; ties keep
    their (module) order. A ``metadata`` entry is ignored."""
    items = [(k, v) for k, v in single_layer.items() if k != "metadata"]
    return [k for k, _ in sorted(items, key=lambda kv: -sum(kv[1]))]


def recipe_thresholds(original: float, linear_8bit: float, num_recipes: int) -> list[float]:
    """``np.linspace(original - 1, linear_8bit + 5, num_recipes)``, in that order."""
    return [float(t) for t in np.linspace(original - 1, linear_8bit + 5, num_recipes)]


def build_recipe(cumulative: dict[str, dict], sizes: dict[str, int], threshold: float,
                 nbits: Sequence[int], default_nbits: int, num_prompts: int):
    """Apple's ``build_recipe``.

    Layers are visited in the order of the smallest bit depth's cumulative curve; a layer gets
    the first (smallest) bit depth whose cumulative point ``sum(values) / num_prompts`` is
    strictly above ``threshold``, else ``default_nbits``. Returns ``(recipe, avg_bits, size_mb)``
    with ``avg_bits = sum(bits * numel) / sum(numel)`` over the candidates (16s included).
    """
    depths = sorted(int(n) for n in nbits)
    recipe: dict[str, int] = {}
    total_bits = 0
    for layer in cumulative[str(depths[0])]:
        if layer == "metadata":
            continue
        chosen = default_nbits
        for n in depths:
            avg = sum(cumulative[str(n)][layer]) / num_prompts
            if avg > threshold:
                chosen = n
                break
        recipe[layer] = chosen
        total_bits += chosen * sizes[layer]
    avg_bits = total_bits / sum(sizes.values())
    return recipe, avg_bits, total_bits / 8e6


def recipe_key(avg_bits: float) -> str:
    return f"recipe_{avg_bits:.2f}_bit_mixedpalette"


# --------------------------------------------------------------------------- the pipeline runs

def load_pipeline(path: str):
    """``DiffusionPipeline.from_pretrained(path)`` in float32 on the CPU."""
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as dlogging

    previous = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        pipe = DiffusionPipeline.from_pretrained(str(path))
    finally:
        dlogging.set_verbosity(previous)
    pipe = pipe.to("cpu", torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def denoiser(pipe) -> nn.Module:
    """Apple palettizes ``pipe.unet``; a transformer pipeline (SD3, Flux, PixArt) has
    ``pipe.transformer`` instead, which is used the same way."""
    unet = getattr(pipe, "unet", None)
    return unet if unet is not None else pipe.transformer


def decode_images(images: Sequence[bytes], size: int) -> list:
    """Apple's ``Image.open(...).convert("RGB").resize((size, size), Image.LANCZOS)``."""
    import io

    from PIL import Image

    return [Image.open(io.BytesIO(data)).convert("RGB").resize((size, size), Image.LANCZOS) for data in images]


class SignalRunner:
    """Apple's ``run_pipe``: one call with all prompts, the generator state restored each time.

    Image-to-image pipelines ("Img2Img" in the class name) get Apple's branch: the images, no
    height/width, 4 steps, strength 0.25. Prompt i gets image i (with fewer prompts than Apple's 8
    images the first ones; with fewer images than prompts they repeat). ``guidance_scale``: None
    keeps the pipeline's default as Apple does; few-step models pass their model card's.
    """

    def __init__(self, prompts: Sequence[str], resolution: int, num_inference_steps: int = 1,
                 images: Sequence[bytes] = (), guidance_scale: float | None = None):
        self.prompts = list(prompts)
        self.resolution = int(resolution)
        self.steps = int(num_inference_steps)
        decoded = decode_images(images, self.resolution)
        self.images = [decoded[i % len(decoded)] for i in range(len(self.prompts))] if decoded else []
        self.guidance_scale = guidance_scale
        self.generator = torch.Generator()  # CPU, default seed (67280421310721)
        self.state = self.generator.get_state()  # saved once
        self.runs = 0
        self.seconds = 0.0

    def __call__(self, pipe) -> np.ndarray:
        import inspect

        self.generator.set_state(self.state)
        kwargs = dict(
            prompt=self.prompts,
            negative_prompt=[""] * len(self.prompts),
            num_inference_steps=self.steps,
            height=self.resolution,
            width=self.resolution,
            output_type="latent",
            generator=self.generator,
        )
        if "Img2Img" in pipe.__class__.__name__:
            kwargs["image"] = self.images
            kwargs.pop("height")
            kwargs.pop("width")
            kwargs["num_inference_steps"] = 4
            kwargs["strength"] = 0.25
        if self.guidance_scale is not None:
            kwargs["guidance_scale"] = self.guidance_scale
        if "use_resolution_binning" in inspect.signature(pipe.__call__).parameters:
            kwargs["use_resolution_binning"] = False  # PixArt: the asked size (a tiny model has no bin)
        start = time.perf_counter()
        with torch.no_grad():
            out = pipe(**kwargs)
        self.seconds += time.perf_counter() - start
        self.runs += 1
        return np.array([latent.cpu().numpy() for latent in out.images])


def find_module(unet: nn.Module, name: str) -> nn.Module:
    for n, m in unet.named_modules():
        if n == name:
            return m
    raise KeyError(name)


def signal_integrity(pipe, layers: Sequence[str], nbits: int, cumulative: bool,
                     ref_out: np.ndarray, run: SignalRunner, palettize: Palettizer,
                     psnr_dtype=None) -> dict[str, list[float]]:
    """Apple's ``benchmark_signal_integrity`` (without the metadata entry)."""
    results: dict[str, list[float]] = {}
    for layer in layers:
        module = find_module(denoiser(pipe), layer)
        original = palettize(module, nbits, layer)
        test_out = run(pipe)
        if not cumulative:
            restore_weight(module, original)
        results[layer] = per_prompt_psnr(ref_out, test_out, psnr_dtype)
        log.debug("%s-bit %s %s: %s", nbits, "cumulative" if cumulative else "isolated",
                  layer, results[layer])
    return results


def simulate(ref_pipe, transform: Callable[[nn.Module], object], run: SignalRunner,
             psnr_dtype=None) -> tuple[float, list[float]]:
    """Apple's ``simulate_quant_fn``: transform a deep copy of the pristine pipeline, run it, run
    the pristine pipeline again as the reference; mean of the rounded per-prompt PSNRs."""
    simulated = copy.deepcopy(ref_pipe)
    transform(denoiser(simulated))
    sim_out = run(simulated)
    del simulated
    ref_out = run(ref_pipe)
    values = per_prompt_psnr(ref_out, sim_out, psnr_dtype)
    return mean_of(values), values


# --------------------------------------------------------------------------- the whole analysis

def run_apple_pre_analysis(
    pipeline_dir: str,
    *,
    nbits: Iterable[int] = APPLE_NBITS,
    resolution: int = APPLE_RESOLUTION,
    min_size: float = APPLE_MIN_SIZE,
    num_recipes: int = APPLE_NUM_RECIPES,
    prompts: Sequence[str] = APPLE_PROMPTS,
    default_nbits: int = UNCOMPRESSED_BITS,
    num_inference_steps: int = 1,
    images: Sequence[bytes] = (),
    guidance_scale: float | None = None,
    model_version: str | None = None,
    int8_dtype=np.float16,
    psnr_dtype=None,
    small_tensor_kmeans: str = "auto",
    num_threads: int | None = None,
) -> dict:
    """Run Apple's pre-analysis serially on the pipeline in ``pipeline_dir`` (CPU, float32).

    Returns Apple's JSON shape::

        {"model_version": str,
         "single_layer": {"<n>": {layer: [psnr per prompt]}},          # no metadata (Apple pops it)
         "cumulative":   {"<n>": {"metadata": {...}, layer: [...]}},   # layers in cumulative order
         "baselines":    {"original": mean, "linear_8bit": mean, "recipe_<avg>_bit_mixedpalette": x},
         "recipes":      {key: {layer: bits}},
         "reference":    {...}}   # extras: thresholds, per-recipe details, per-prompt baselines,
                                  # candidates/sizes, run counts, timings, forced-kmeans1d layers

    Parameters mirror Apple's constants/flags: ``nbits`` (Apple's NBITS), ``resolution``
    (TEST_RESOLUTION; the tiny built-in models need 64), ``min_size`` (PALETTIZE_MIN_SIZE),
    ``num_recipes`` (--num-recipes), ``prompts`` (RANDOM_TEST_DATA), ``default_nbits``
    (--default-nbits). ``int8_dtype`` is the numpy dtype of the fake-int8 arithmetic (Apple:
    its fp16 weights; ``None`` = the loaded weights' dtype), ``psnr_dtype`` the dtype of
    ``compute_psnr`` (Apple: the outputs' dtype; pass ``np.float64`` to compare with float64
    code), ``small_tensor_kmeans`` see :func:`kmeans_palettize_array`. ``num_threads``: torch
    intra-op threads for the duration of the call (None: leave as is; 1 is fastest on a busy
    2-core machine, where 2 threads spin — and the thread count can change float summation
    order, so compare against a run with the same setting).
    """
    if num_threads is None:
        return _run(pipeline_dir, nbits, resolution, min_size, num_recipes, prompts, default_nbits,
                    (num_inference_steps, images, guidance_scale), model_version, int8_dtype, psnr_dtype,
                    small_tensor_kmeans)
    previous = torch.get_num_threads()
    torch.set_num_threads(int(num_threads))
    try:
        return _run(pipeline_dir, nbits, resolution, min_size, num_recipes, prompts, default_nbits,
                    (num_inference_steps, images, guidance_scale), model_version, int8_dtype, psnr_dtype,
                    small_tensor_kmeans)
    finally:
        torch.set_num_threads(previous)


def _run(pipeline_dir, nbits, resolution, min_size, num_recipes, prompts, default_nbits,
         signal, model_version, int8_dtype, psnr_dtype, small_tensor_kmeans) -> dict:
    t_start = time.perf_counter()
    depths = [int(n) for n in nbits]
    if not depths or any(n not in ALLOWED_BITS for n in depths):
        raise ValueError(f"nbits must be a non-empty subset of {ALLOWED_BITS}: {depths}")
    if depths != sorted(set(depths)):
        raise ValueError("nbits must be strictly ascending, as Apple's NBITS")
    if default_nbits not in ALLOWED_BITS + (UNCOMPRESSED_BITS,):
        raise ValueError(f"default_nbits must be one of {ALLOWED_BITS + (UNCOMPRESSED_BITS,)}")
    if num_recipes < 1:
        raise ValueError("num_recipes must be >= 1")
    prompts = list(prompts)
    palettize = Palettizer(small_tensor_kmeans)
    timings: dict[str, float] = {}

    pipe = load_pipeline(pipeline_dir)
    run = SignalRunner(prompts, resolution, *signal)

    ref_pipe = copy.deepcopy(pipe)  # pristine copy: baselines and recipes are measured on it
    if default_nbits != UNCOMPRESSED_BITS:
        palettize_every_weight(denoiser(pipe), default_nbits, palettize)
    ref_out = run(pipe)  # the analysis reference (the default-nbits model if any)

    candidates = candidate_layers(denoiser(pipe), min_size)
    if not candidates:
        raise ValueError(f"no Linear/Conv2d weight has more than {min_size} elements")
    names = [n for n, _ in candidates]
    sizes = dict(candidates)

    single_layer: dict[str, dict] = {}
    cumulative: dict[str, dict] = {}
    for n in depths:
        t0 = time.perf_counter()
        single_layer[str(n)] = signal_integrity(pipe, names, n, False, ref_out, run, palettize,
                                                psnr_dtype)
        t1 = time.perf_counter()
        order = descending_psnr_order(single_layer[str(n)])
        curve = signal_integrity(copy.deepcopy(pipe), order, n, True, ref_out, run, palettize,
                                 psnr_dtype)
        cumulative[str(n)] = {
            "metadata": {"nbits": n, "out_ngroups": 1, "in_ngroups": 1, "cumulative": True,
                         "candidates": list(order), "sizes": [sizes[k] for k in order]},
            **curve,
        }
        timings[f"isolated_{n}"] = t1 - t0
        timings[f"cumulative_{n}"] = time.perf_counter() - t1

    t0 = time.perf_counter()
    original, original_pp = simulate(ref_pipe, lambda unet: None, run, psnr_dtype)
    linear_8bit, linear_pp = simulate(ref_pipe, lambda unet: fake_int8_unet(unet, int8_dtype),
                                      run, psnr_dtype)
    baselines: dict[str, float] = {"original": original, "linear_8bit": linear_8bit}
    timings["baselines"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    thresholds = recipe_thresholds(original, linear_8bit, num_recipes)
    recipes: dict[str, dict] = {}
    recipe_details = []
    for threshold in thresholds:
        recipe, avg_bits, size_mb = build_recipe(cumulative, sizes, threshold, depths,
                                                 default_nbits, len(prompts))
        achieved, per_prompt = simulate(
            ref_pipe, lambda unet, r=recipe: apply_recipe(unet, r, palettize),
            run, psnr_dtype)
        key = recipe_key(avg_bits)
        baselines[key] = round_psnr(achieved)
        recipes[key] = recipe
        recipe_details.append({"key": key, "threshold": threshold, "avg_bits": avg_bits,
                               "size_mb": size_mb, "psnr_mean": achieved,
                               "psnr_per_prompt": per_prompt})
    timings["recipes"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start

    return {
        "model_version": model_version or str(pipeline_dir),
        "baselines": baselines,
        "recipes": recipes,
        "single_layer": single_layer,
        "cumulative": cumulative,
        "reference": {
            "pipeline_class": type(pipe).__name__,
            "nbits": depths,
            "resolution": int(resolution),
            "min_size": min_size,
            "num_recipes": int(num_recipes),
            "default_nbits": int(default_nbits),
            "prompts": prompts,
            "candidates": names,
            "sizes": [sizes[k] for k in names],
            "thresholds": thresholds,
            "recipe_details": recipe_details,
            "baseline_per_prompt": {"original": original_pp, "linear_8bit": linear_pp},
            "kmeans1d_forced": palettize.forced,
            "kmeans_fits": palettize.fits,
            "kmeans_seconds": palettize.seconds,
            "pipeline_runs": run.runs,
            "pipeline_seconds": run.seconds,
            "timings": timings,
        },
    }


def cumulative_mean(result: dict, nbits: int, layer: str) -> float:
    """The value Apple's recipe rule compares: ``sum(per-prompt) / #prompts`` at that point."""
    values = result["cumulative"][str(nbits)][layer]
    return sum(values) / len(values)


def main(argv=None) -> None:  # pragma: no cover - convenience for manual runs
    import argparse
    import json

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("pipeline_dir")
    p.add_argument("--nbits", default="1,2,4,6,8")
    p.add_argument("--resolution", type=int, default=APPLE_RESOLUTION)
    p.add_argument("--min-size", type=float, default=APPLE_MIN_SIZE)
    p.add_argument("--num-recipes", type=int, default=APPLE_NUM_RECIPES)
    p.add_argument("--default-nbits", type=int, default=UNCOMPRESSED_BITS)
    p.add_argument("-o", default="-")
    a = p.parse_args(argv)
    result = run_apple_pre_analysis(
        a.pipeline_dir, nbits=[int(x) for x in a.nbits.split(",")], resolution=a.resolution,
        min_size=a.min_size, num_recipes=a.num_recipes, default_nbits=a.default_nbits)
    text = json.dumps(result, indent=2)
    if a.o == "-":
        print(text)
    else:
        with open(a.o, "w") as f:
            f.write(text)


if __name__ == "__main__":  # pragma: no cover
    main()
