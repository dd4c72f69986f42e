"""Search configuration: frozen, validated at construction, stored with every search."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, fields

from common.formats import FLOAT16_BITS, PALETTE_NBITS, PaletteFormat, is_palettized, parse_formats
from workers.evaluation.protocol import PROTOCOLS, default_prompts
from workers.evaluation.signal import SignalSpec
from search.defaults import REFINE_EVALS

PRECISIONS = ("auto", "float16", "float32")
STRATEGIES = ("apple", "optimal")
EVALS = ("full", "fast")
TARGETS = ("coreml", "coreai")  # what --apply builds (docs/coreai.md)
EXECUTION_ONLY = ("prefix_reuse", "compile", "reuse", "reuse_across_devices")
GALLERY_FIELDS = ("gallery", "gallery_steps", "gallery_resolution")  # images after the recipes: not measured


class ConfigError(ValueError):
    """Bad configuration value; the message is one line for the user."""


def parse_nbits(text: str, option: str = "--nbits") -> tuple[int, ...]:
    """'1,2,4' -> (1, 2, 4): Apple's per-tensor depths only (3-bit and grouped formats need iOS 18
    and are spelled with --formats); anything else is an error, not a silent drop."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if not parts:
        raise ConfigError(f"{option} is empty; choose from " + ",".join(map(str, PALETTE_NBITS)))
    values = []
    for p in parts:
        try:
            values.append(int(p))
        except ValueError:
            raise ConfigError(f"{option}: '{p}' is not an integer; choose from {','.join(map(str, PALETTE_NBITS))} "
                              "(--formats takes grouped formats such as 4g16)") from None
    bad = [b for b in values if b not in PALETTE_NBITS]
    if bad:
        raise ConfigError(f"unsupported bit depth(s) {','.join(map(str, bad))} for {option}; choose from "
                          f"{','.join(map(str, PALETTE_NBITS))} (3 bits and grouped formats: --formats)")
    return tuple(values)


def parse_format_list(text: str, option: str = "--formats") -> tuple:
    """'2,3g16,4' -> their JSON spellings (2, '3g16', 4): per-tensor formats stay ints, so a
    search's stored options and config read exactly as before formats existed."""
    if not str(text).strip():
        raise ConfigError(f"{option} is empty; e.g. 2,3g16,4,4g16,6,8")
    try:
        return tuple(f.to_json() for f in parse_formats(text))
    except ValueError as exc:
        raise ConfigError(f"{option}: {exc}") from None


def parse_floats(text: str, option: str) -> tuple[float, ...]:
    values = []
    for p in (p.strip() for p in str(text).split(",")):
        try:
            values.append(float(p))
        except ValueError:
            raise ConfigError(f"{option}: '{p}' is not a number") from None
        if values[-1] != values[-1] or values[-1] in (float("inf"), float("-inf")):
            raise ConfigError(f"{option}: '{p}' is not a finite number")
    return tuple(values)


def parse_strategy(text: str) -> tuple[str, ...]:
    return STRATEGIES if text.strip() == "both" else tuple(p.strip() for p in text.split(",") if p.strip())


def parse_prompts_file(path: str) -> tuple[str, ...]:
    """One prompt per line; blank lines and lines starting with '#' are ignored."""
    try:
        with open(path, encoding="utf-8") as fh:
            lines = [ln.strip() for ln in fh]
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read prompts file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    prompts = tuple(ln for ln in lines if ln and not ln.startswith("#"))
    if not prompts:
        raise ConfigError(f"prompts file {path} has no prompts (one per line)")
    return prompts


def _formats(values, what: str) -> tuple[PaletteFormat, ...]:
    """Formats from ints / spellings / formats; float16 and bad spellings are one-line errors."""
    out = []
    for v in values:
        try:
            f = PaletteFormat.of(v)
        except (ValueError, AttributeError) as exc:
            raise ConfigError(f"bad {what} {v!r}: {exc}") from None
        if not f.palettized:
            raise ConfigError(f"unsupported bit depth(s) {v}; float16 is always a choice, list palette formats")
        out.append(f)
    return tuple(out)


@dataclass(frozen=True)
class SearchConfig:
    """Everything that determines a search's measurements (its identity for resume)."""

    nbits: tuple[PaletteFormat, ...] = PALETTE_NBITS  # the formats searched (--nbits / --formats)
    num_recipes: int = 7
    min_size: int = 100_000
    prompts: tuple[str, ...] = ()          # () -> the protocol's own prompts
    seed: int | None = None               # None -> the protocol's own noise (Apple: torch.Generator() default)
    steps: int = 1
    resolution: int = 1024
    guidance_scale: float | None = None
    batch_size: int = 0
    images: tuple[str, ...] = ()          # image-to-image: sha256 of each image (workers.evaluation.images)
    precision: str = "auto"
    strategy: tuple[str, ...] = ("apple",)
    targets: tuple[float, ...] = ()       # average bits per weight of the optimal recipes to build
    evals: str = "full"                   # "fast": isolated impact at the anchors only, the rest predicted
    anchors: tuple[PaletteFormat, ...] | None = None  # fast mode's measured formats; default: the one nearest 4
    curves: bool | None = None            # cumulative curves; None: only when the Apple strategy needs them
    protocol: str = "apple"               # what a PSNR means (workers.evaluation.protocol)
    default_nbits: int = FLOAT16_BITS               # Apple's --default-nbits: every weight palettized first, fallback depth
    refine_evals: int = REFINE_EVALS       # measured refinement per optimal target (0: one-shot)
    loras: tuple[str, ...] = ()           # single-file checkpoints: LoRAs fused first, "PATH:SCALE"
    config_dir: str | None = None         # single-file checkpoints: --config, the diffusers configs they load with
    target: str = "coreml"                # what --apply builds: coreml, or coreai (Core AI folders; no 3-bit)
    # How the evaluators run, not what they measure (left out of the fingerprint):
    prefix_reuse: bool = True             # resume each forward at the first changed module (bit-identical)
    compile: bool = False                 # torch.compile the UNet's blocks
    reuse: bool = True                    # copy stored measurements with the same key (docs/reuse.md)
    reuse_across_devices: bool = False    # ... also those measured on another device class
    # The gallery after the recipes (docs/gallery.md; also left out of the fingerprint):
    gallery: bool = True                  # images of float16, linear_8bit and every recipe
    gallery_steps: int | None = None      # None: 20, or a few-step model's own count
    gallery_resolution: int | None = None  # None: the model's native resolution

    def __post_init__(self) -> None:
        nbits = _formats(self.nbits, "palette format")
        if not nbits:
            raise ConfigError(f"unsupported bit depth(s) (none); choose from {','.join(map(str, PALETTE_NBITS))}")
        if len(set(nbits)) != len(nbits):
            raise ConfigError(f"--nbits lists a bit depth twice: {','.join(map(str, nbits))}")
        object.__setattr__(self, "nbits", tuple(sorted(nbits)))
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"unknown protocol '{self.protocol}'; choose from {', '.join(PROTOCOLS)}")
        object.__setattr__(self, "prompts", tuple(self.prompts) or default_prompts(self.protocol))
        if self.default_nbits not in PALETTE_NBITS + (FLOAT16_BITS,):
            raise ConfigError(f"--default-nbits must be one of {','.join(map(str, PALETTE_NBITS + (FLOAT16_BITS,)))}, "
                              f"got {self.default_nbits}")
        if is_palettized(self.default_nbits) and self.protocol != "apple":
            raise ConfigError("--default-nbits is part of Apple's protocol: use it with --protocol apple")
        for flag in EXECUTION_ONLY:
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"--{flag.replace('_', '-')} is a switch (true or false), got {getattr(self, flag)!r}")
        if not isinstance(self.num_recipes, int) or not 1 <= self.num_recipes <= 100:
            raise ConfigError(f"--num-recipes must be between 1 and 100, got {self.num_recipes}")
        if not isinstance(self.min_size, int) or self.min_size < 0:
            raise ConfigError(f"--min-size must be a non-negative integer, got {self.min_size}")
        self._check_strategy()
        self._check_gallery()
        self._check_target()
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got '{self.precision}'")
        object.__setattr__(self, "images", tuple(self.images))
        object.__setattr__(self, "loras", tuple(self.loras))
        if any(not isinstance(x, str) for x in self.loras) or not isinstance(self.config_dir, (str, type(None))):
            raise ConfigError("--lora takes FILE[:SCALE] and --config a folder")
        try:
            self.signal_spec(load_images=False)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def _check_target(self) -> None:
        """Core AI (issue 36): coreai-opt 0.4.0 packs 1/2/4/6/8-bit LUTs only, so a search meant
        for it must not measure (or default every weight to) 3 bits."""
        if self.target not in TARGETS:
            raise ConfigError(f"--target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        three = [str(f) for f in self.nbits if f.bits == 3] + (["--default-nbits 3"] if self.default_nbits == 3 else [])
        if self.target == "coreai" and three:
            raise ConfigError(f"--target coreai cannot use 3-bit formats ({', '.join(three)}): Core AI "
                              "(coreai-opt 0.4.0) packs 1, 2, 4, 6 and 8-bit LUTs only; leave 3 out of --nbits / --formats")

    def _check_strategy(self) -> None:
        strategy = tuple(self.strategy)
        if not strategy or any(s not in STRATEGIES for s in strategy) or len(set(strategy)) != len(strategy):
            raise ConfigError(f"--strategy must be apple, optimal or both, got {','.join(strategy) or '(none)'}")
        object.__setattr__(self, "strategy", tuple(s for s in STRATEGIES if s in strategy))
        targets = tuple(float(t) for t in self.targets)
        bad = [t for t in targets if not 1.0 <= t <= 16.0]
        if bad:
            raise ConfigError(f"--targets are average bits per weight between 1 and 16, got {bad[0]:g}")
        object.__setattr__(self, "targets", tuple(sorted(set(targets), reverse=True)))
        if targets and "optimal" not in self.strategy:
            raise ConfigError("--targets builds optimal recipes: add --strategy optimal (or both)")
        if isinstance(self.refine_evals, bool) or not isinstance(self.refine_evals, int) or \
                not 0 <= self.refine_evals <= 10_000:
            raise ConfigError(f"--refine-evals must be an integer between 0 and 10000, got {self.refine_evals}")
        if self.evals not in EVALS:
            raise ConfigError(f"--evals must be full or fast, got '{self.evals}'")
        if self.anchors is None:
            object.__setattr__(self, "anchors", (min(self.nbits, key=lambda f: (abs(f.bits - 4), -f.bits, f)),))
        anchors = tuple(sorted(set(_formats(self.anchors, "anchor"))))
        if not anchors or any(a not in self.nbits for a in anchors):
            raise ConfigError(f"--anchors must be among the searched bit depths {','.join(map(str, self.nbits))}")
        object.__setattr__(self, "anchors", anchors)
        if self.evals == "fast" and "apple" in self.strategy:
            raise ConfigError("--evals fast measures too little for Apple's recipes: use it with --strategy optimal")
        if self.curves is None:
            object.__setattr__(self, "curves", "apple" in self.strategy)
        elif "apple" in self.strategy and not self.curves:
            raise ConfigError("the Apple strategy needs cumulative curves; drop --no-curves")

    def _check_gallery(self) -> None:
        if not isinstance(self.gallery, bool):
            raise ConfigError(f"--gallery is a switch (true or false), got {self.gallery!r}")
        steps, res = self.gallery_steps, self.gallery_resolution
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 1000):
            raise ConfigError(f"--gallery-steps must be an integer between 1 and 1000, got {steps}")
        if res is not None and (isinstance(res, bool) or not isinstance(res, int) or not 8 <= res <= 4096 or res % 8):
            raise ConfigError(f"--gallery-resolution must be a multiple of 8 pixels between 8 and 4096, got {res}")

    def optimal_targets(self) -> tuple[float, ...]:
        """Requested targets, else num_recipes budgets spread over the searched bit depths."""
        if self.targets:
            return self.targets
        depths = [f.bits for f in self.nbits]
        hi = min(max(depths), 8)
        lo = min(depths) if hi <= 2 else max(min(depths), 2)
        n = self.num_recipes
        return tuple(round(hi - (hi - lo) * i / max(n - 1, 1), 2) for i in range(n)) if n > 1 else (float(hi),)

    def signal_spec(self, load_images: bool = True) -> SignalSpec:
        """What the evaluators measure; an image-to-image search's images travel in it as bytes
        (read here from this node's cache), so every evaluator on every node has the same."""
        from workers.evaluation.images import load_images as read_images

        images = read_images(self.images) if load_images and self.images else ()
        return SignalSpec(prompts=self.prompts, seed=self.seed, protocol=self.protocol, steps=self.steps,
                          resolution=self.resolution, guidance_scale=self.guidance_scale,
                          batch_size=self.batch_size, images=images)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}  # not asdict: formats stay values
        for key in ("nbits", "prompts", "strategy", "targets", "anchors"):
            d[key] = list(d[key]) if d[key] is not None else None
        for key in ("nbits", "anchors"):  # per-tensor formats as ints: older configs' fingerprints hold
            d[key] = [PaletteFormat.of(f).to_json() for f in d[key]] if d[key] is not None else None
        if d["images"]:
            d["images"] = list(d["images"])
        else:  # text-to-image: the dict (and fingerprint) of earlier releases
            del d["images"]
        d["loras"] = list(d["loras"])
        for key in ("loras", "config_dir"):  # only single-file searches store them (older fingerprints hold)
            if not d[key]:
                del d[key]
        if d["target"] == "coreml":  # the stored config (and fingerprint) of earlier releases
            del d["target"]
        for key, default in (("gallery", True), ("gallery_steps", None), ("gallery_resolution", None)):
            if d[key] == default:  # the stored config of earlier releases
                del d[key]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SearchConfig":
        d = dict(d)
        d.pop("extra", None)  # an always-empty field of earlier releases, still in their stored configs
        d.setdefault("protocol", "classic")  # searches stored before protocols existed measured this way
        d.setdefault("refine_evals", 0)  # stored before measured refinement: one-shot
        for key in ("nbits", "prompts", "strategy", "targets", "anchors", "images", "loras"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)

    def fingerprint(self) -> str:
        """Identity of a search for duplicate detection and resume (what it measures: execution
        switches such as prefix reuse and compile give the same numbers)."""
        d = {k: v for k, v in self.to_dict().items() if k not in EXECUTION_ONLY + GALLERY_FIELDS}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()
