"""Search configuration: frozen, validated at construction, stored with every search."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace

from workers.palettize import SUPPORTED_NBITS
from workers.signal import DEFAULT_PROMPTS, SignalSpec

PRECISIONS = ("auto", "float16", "float32")


class ConfigError(ValueError):
    """Bad configuration value; the message is one line for the user."""


def parse_nbits(text: str) -> tuple[int, ...]:
    """'1,2,4' -> (1, 2, 4); anything outside SUPPORTED_NBITS is an error, not a silent drop."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if not parts:
        raise ConfigError("--nbits is empty; choose from " + ",".join(map(str, SUPPORTED_NBITS)))
    values = []
    for p in parts:
        try:
            values.append(int(p))
        except ValueError:
            raise ConfigError(f"--nbits: '{p}' is not an integer; choose from {','.join(map(str, SUPPORTED_NBITS))}") from None
    return tuple(values)


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


@dataclass(frozen=True)
class SearchConfig:
    """Everything that determines a search's measurements (its identity for resume)."""

    nbits: tuple[int, ...] = SUPPORTED_NBITS
    num_recipes: int = 7
    min_size: int = 100_000
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    seed: int = 0
    steps: int = 1
    resolution: int = 1024
    guidance_scale: float | None = None
    batch_size: int = 0
    precision: str = "auto"
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        nbits = tuple(self.nbits)
        bad = [b for b in nbits if b not in SUPPORTED_NBITS]
        if bad or not nbits:
            raise ConfigError(
                f"unsupported bit depth(s) {','.join(map(str, bad)) or '(none)'}; choose from {','.join(map(str, SUPPORTED_NBITS))}")
        if len(set(nbits)) != len(nbits):
            raise ConfigError(f"--nbits lists a bit depth twice: {','.join(map(str, nbits))}")
        object.__setattr__(self, "nbits", tuple(sorted(nbits)))
        object.__setattr__(self, "prompts", tuple(self.prompts))
        if not isinstance(self.num_recipes, int) or not 1 <= self.num_recipes <= 100:
            raise ConfigError(f"--num-recipes must be between 1 and 100, got {self.num_recipes}")
        if not isinstance(self.min_size, int) or self.min_size < 0:
            raise ConfigError(f"--min-size must be a non-negative integer, got {self.min_size}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got '{self.precision}'")
        try:
            self.signal_spec()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def signal_spec(self) -> SignalSpec:
        return SignalSpec(prompts=self.prompts, seed=self.seed, steps=self.steps, resolution=self.resolution,
                          guidance_scale=self.guidance_scale, batch_size=self.batch_size)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["nbits"], d["prompts"] = list(self.nbits), list(self.prompts)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SearchConfig":
        d = dict(d)
        d["nbits"], d["prompts"] = tuple(d["nbits"]), tuple(d["prompts"])
        return cls(**d)

    def fingerprint(self) -> str:
        """Identity of a search for duplicate detection and resume."""
        d = self.to_dict()
        d.pop("extra")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()

    def with_(self, **changes) -> "SearchConfig":
        return replace(self, **changes)
