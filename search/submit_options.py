"""The options of a search submission, declared once: the flags of `search submit` and the
fields of the service's ``POST /searches`` body are both built from ``SEARCH_OPTIONS``, and both
are parsed by ``parse_search_options`` (the same functions, the same messages).

Light on purpose (no torch, no pydantic, no typer): the command line builds its help from this
table without loading a model stack. A default of None means "decided by `SearchConfig` or by
the model" (min size, resolution, anchors, curves); the other defaults are what SearchConfig
uses too.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Mapping, Optional, Union

from annotated_types import Len

from common.formats import PALETTE_NBITS

WORKERS_HELP = "evaluator actors [default: GPUs, else 2]"
from search.defaults import REFINE_EVALS  # noqa: E402  (measured refinement per optimal target; see README)
REFINE_EVALS_HELP = (f"end-to-end measurements per optimal target for the measured refinement (an evolutionary "
                     f"search from the better of Apple's and the knapsack's recipe; 0: one-shot) [default: "
                     f"{REFINE_EVALS}]")
RESUME_HELP = "if an unfinished search has this model and config, resume it"
APPLY_HELP = ("after the recipes, apply them on the cluster's Core ML node, validate them and ship the .mlpackage "
              "files to the service: 'all' or comma-separated recipe keys")
TARGET_HELP = ("what --apply builds: coreml (Core ML packages and the Swift pipeline's Resources folders) or coreai "
               "(the folder Apple's Core AI exporter writes, checked on the Linux Core AI runtime, on any node; needs "
               "the [coreai] extra; 3-bit formats refused: docs/coreai.md)")
COREML_NODE_HELP = ("with --apply: 'coreml' = a node started with the custom resource coreml (a Mac), 'any' = any "
                    "node (everything but Core ML prediction) [default: coreml]")


def parse_apply(value, coreml_node=None, target="coreml") -> tuple[str, str]:
    """``--apply`` / ``apply``: 'all', or the recipe keys as one comma string without blanks or
    repeats; and ``--coreml-node`` (default coreml; with ``--target coreai`` any: Core AI runs on
    Linux). ConfigError (one line) otherwise."""
    from search.config import ConfigError

    keys = list(dict.fromkeys(k.strip() for k in str(value or "").split(",") if k.strip()))
    if not keys:
        raise ConfigError("--apply: give 'all' or recipe keys separated by commas")
    node = coreml_node or ("any" if target == "coreai" else "coreml")
    if node not in ("coreml", "any"):
        raise ConfigError(f"--coreml-node must be coreml or any, got '{node}'")
    return ("all" if "all" in keys else ",".join(keys)), node


@dataclass(frozen=True)
class SearchOption:
    """One option of a search: its flag(s), the type the flag takes, the type a JSON body may give
    (wider: lists for the CLI's comma strings), its default and help, and how its value is parsed."""

    name: str
    flags: tuple[str, ...]
    cli_type: Any
    default: Any = None
    help: Optional[str] = None
    json_type: Any = None                  # default: cli_type
    json_field: dict = field(default_factory=dict)  # constraints of the JSON field (pydantic Field arguments)
    parse: Optional[Callable[[Any], Any]] = None   # raw value -> SearchConfig value (None: as is)


def _text(value) -> str:
    """A JSON list (or number) as the CLI's comma string."""
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def _given(value) -> bool:
    return value not in (None, "", [])


def _nbits(value):
    from search.config import parse_nbits

    return parse_nbits(_text(value)) if _given(value) else None


def _formats(value):
    from search.config import parse_format_list

    return parse_format_list(_text(value)) if _given(value) else None


def _strategy(value):
    from search.config import parse_strategy

    return parse_strategy(value)


def _targets(value):
    from search.config import parse_floats

    return parse_floats(_text(value), "--targets") if _given(value) else ()


def _anchors(value):
    from search.config import parse_format_list

    return parse_format_list(_text(value), "--anchors") if _given(value) else None


def _folder(value):
    """An absolute folder path (the images are read where the search is prepared)."""
    return str(Path(value).expanduser().resolve()) if _given(value) else None


def _loras(value):
    """``--lora FILE[:SCALE]`` (repeatable) -> ("ABSOLUTE_PATH:SCALE", ...): checked here (file exists, scale a
    number), read and fused when the search is prepared (workers.lora)."""
    from search.config import ConfigError
    from workers.lora import parse_lora
    from workers.model_spec import ModelError

    if not _given(value):
        return None
    out = []
    for text in ([value] if isinstance(value, str) else value):
        try:
            path, scale = parse_lora(text)
        except ModelError as exc:
            raise ConfigError(str(exc)) from None
        out.append(f"{path}:{scale!r}")
    return tuple(out)


def _config_dir(value):
    """``--config DIR``: a diffusers pipeline directory (model_index.json and configs), absolute."""
    from search.config import ConfigError

    if not _given(value):
        return None
    path = Path(value).expanduser().resolve()
    if not (path / "model_index.json").is_file():
        raise ConfigError(f"--config '{value}' is not a diffusers pipeline directory (no model_index.json)")
    return str(path)


def check_coreai_installed(target) -> None:
    """``--target coreai`` needs the [coreai] extra where the search runs: one line saying how to
    install it, before anything is stored or measured (the local command line and the service
    call it; a client sending to a service does not need the packages itself)."""
    from search.config import ConfigError

    if target == "coreai":
        from workers import coreai

        if not coreai.available():
            raise ConfigError(f"--target coreai: {coreai.INSTALL_HINT}")


def _prompts(value):
    """The prompts themselves (the CLI reads them from its --prompts file first)."""
    from search.config import ConfigError

    if value is None:
        return None
    prompts = tuple(p.strip() for p in value if p.strip())
    if not prompts:
        raise ConfigError("prompts are all blank")
    return prompts


SEARCH_OPTIONS: tuple[SearchOption, ...] = (
    SearchOption("nbits", ("--nbits",), Optional[str], None,
                 "per-tensor bit depths to analyse, from " + ",".join(map(str, PALETTE_NBITS)) +
                 " [default: all]", json_type=Union[str, int, list[int], None], parse=_nbits),
    SearchOption("formats", ("--formats",), Optional[str], None,
                 "palette formats to analyse (generalizes --nbits): 4 is one 4-bit LUT per tensor, 4g16 one per "
                 "16 output channels; bits 1,2,3,4,6,8, e.g. 2,3g16,4,4g16,6,8 (3 bits and grouped formats need "
                 "iOS 18 / macOS 15) [default: --nbits]",
                 json_type=Union[str, int, list[Union[int, str]], None], parse=_formats),
    SearchOption("num_recipes", ("--num-recipes",), int, 7, "PSNR thresholds, one recipe each"),
    SearchOption("min_size", ("--min-size",), Optional[int], None, "candidate weights have more elements than this "
                 "[default: 100000; tiny models: smaller]"),
    SearchOption("prompts", ("--prompts",), Optional[Path], None, "calibration prompts file, one per line",
                 json_type=Optional[list[Annotated[str, Len(1, 2000)]]],
                 json_field=dict(min_length=1, max_length=1024,
                                 description="calibration prompts (the CLI sends the lines of --prompts)"),
                 parse=_prompts),
    SearchOption("protocol", ("--protocol",), str, "apple", "what a PSNR means: apple (Apple's pre-analysis "
                 "exactly: its 8 prompts and generator, 768 px for Hub/local models, peak of the test output, "
                 "0.1 dB rounding, per-tensor int8 baseline of every weight; built-in tiny models keep their "
                 "64 px) or classic (own prompts, --seed latents, unrounded, per-channel 8-bit baseline)"),
    SearchOption("default_nbits", ("--default-nbits",), int, 16, "Apple's --default-nbits: palettize every UNet "
                 "weight to this depth before the analysis; layers that pass no threshold fall back to it "
                 "(1,2,4,6,8; 16: off)"),
    SearchOption("seed", ("--seed",), Optional[int], None, "noise seed (default: the protocol's own: Apple's "
                 "is torch.Generator()'s default seed, classic's 0)"),
    SearchOption("steps", ("--steps",), Optional[int], None, "denoising steps per pipeline run [default: the "
                 "model's: 1 (Apple) for text-to-image UNets, 4 for image-to-image (Apple), the pipeline's own for "
                 "transformers, the model card's for few-step models]"),
    SearchOption("images_dir", ("--images",), Optional[Path], None, "image-to-image pipelines: a folder of images "
                 "(one per prompt, in name order) [default: Apple's 8 COCO photographs, fetched once into the "
                 "model cache]", json_type=Optional[str], parse=_folder,
                 json_field=dict(description="image-to-image pipelines: a folder on the server, accepted only under "
                                 "its --allow-images-dir; otherwise send the images themselves as images")),
    SearchOption("resolution", ("--resolution",), Optional[int], None, "image size in pixels (default: 768 under the apple "
                 "protocol, the tiny models' own 64; classic: the model's default)"),
    SearchOption("batch_size", ("--batch-size",), int, 0, "prompts per pipeline call [0: all]"),
    SearchOption("precision", ("--precision",), str, "auto", "auto (fp16 on GPU, fp32 on CPU), float16, float32"),
    SearchOption("strategy", ("--strategy",), str, "apple", "apple (Apple's thresholds), optimal (knapsack on "
                 "predicted PSNR), or both", parse=_strategy),
    SearchOption("targets", ("--targets",), Optional[str], None, "average bits of the optimal recipes, e.g. 3,4,5,6",
                 json_type=Union[str, float, list[float], None], parse=_targets),
    SearchOption("evals", ("--evals",), str, "full", "full, or fast: isolated impact at the anchor bit depths only "
                 "(optimal strategy)"),
    SearchOption("anchors", ("--anchors",), Optional[str], None, "anchor formats measured by --evals fast "
                 "[default: the searched depth nearest 4]", json_type=Union[str, int, list[Union[int, str]], None],
                 parse=_anchors),
    SearchOption("refine_evals", ("--refine-evals",), int, REFINE_EVALS, REFINE_EVALS_HELP),
    SearchOption("prefix_reuse", ("--prefix-reuse/--no-prefix-reuse",), bool, True, "resume every evaluation's "
                 "UNet forward from the reference run's cached activations at the first module it changes "
                 "(bit-identical results; costs GPU memory for the cached activations)"),
    SearchOption("compile", ("--compile/--no-compile",), bool, False, "torch.compile the UNet's blocks (minutes "
                 "of compiling per evaluator; weights are swapped in place, so nothing recompiles)"),
    SearchOption("curves", ("--curves/--no-curves",), Optional[bool], None, "cumulative curves [default: only for "
                 "the apple strategy]"),
    SearchOption("loras", ("--lora",), Optional[list[str]], None, "single-file checkpoints: a LoRA to fuse into the "
                 "weights first, FILE[:SCALE] (kohya, A1111 or diffusers format; scale 1 by default); repeatable",
                 json_type=Optional[list[str]], parse=_loras),
    SearchOption("config_dir", ("--config",), Optional[Path], None, "single-file checkpoints of a non-standard "
                 "shape: a diffusers pipeline directory whose configs (and tokenizers) they are loaded with",
                 json_type=Optional[str], parse=_config_dir),
    SearchOption("reuse", ("--reuse/--no-reuse",), bool, True, "copy every measurement an earlier search in this "
                 "database made with the same model, protocol and device class instead of running it again "
                 "(docs/reuse.md); --no-reuse measures everything"),
    SearchOption("reuse_across_devices", ("--reuse-across-devices",), bool, False, "also reuse measurements made on "
                 "another device class (CUDA, MPS, CPU) in the same precision"),
    SearchOption("target", ("--target",), str, "coreml", TARGET_HELP, json_type=Literal["coreml", "coreai"]),
    SearchOption("gallery", ("--gallery/--no-gallery",), bool, True, "after the recipes, generate full images of "
                 "the float16 model, linear 8-bit and every recipe (the search's prompts and seeds) and score them "
                 "with image PSNR/SSIM (docs/gallery.md)"),
    SearchOption("gallery_steps", ("--gallery-steps",), Optional[int], None, "denoising steps of the gallery's "
                 "images [default: 20; a few-step model's own count]"),
    SearchOption("gallery_resolution", ("--gallery-resolution",), Optional[int], None, "the gallery's image size in "
                 "pixels [default: the model's native resolution]"),
)


def parse_search_options(values: Mapping[str, Any]) -> dict:
    """`SearchConfig` keyword arguments from raw option values (the CLI's flags, with the prompts
    file already read into a list, or the service's JSON body), validated: a bad value raises
    ConfigError before any model is loaded. None means "SearchConfig's or the model's default"."""
    from search.config import SearchConfig

    from search.config import ConfigError

    options = {}
    for o in SEARCH_OPTIONS:
        value = values.get(o.name, o.default)
        options[o.name] = o.parse(value) if o.parse else value
    formats = options.pop("formats")  # the search space is one config field; --nbits is its per-tensor spelling
    if formats is not None and options["nbits"] is not None:
        raise ConfigError("give --formats or --nbits, not both (--formats 1,2,4,6,8 is --nbits 1,2,4,6,8)")
    options["nbits"] = formats or options["nbits"] or PALETTE_NBITS
    if options["prompts"] is None:
        del options["prompts"]
    SearchConfig(**{k: v for k, v in options.items() if v is not None and k != "images_dir"})  # images: at prepare
    return options


__all__ = ["SEARCH_OPTIONS", "SearchOption", "parse_search_options", "check_coreai_installed", "TARGET_HELP",
           "WORKERS_HELP", "RESUME_HELP", "REFINE_EVALS",
           "REFINE_EVALS_HELP"]
