"""Plain messages between the driver and the evaluators."""
from __future__ import annotations

from dataclasses import dataclass

from workers.evaluation.signal import SignalSpec

PHASES = ("palette", "isolated", "cumulative", "baseline", "recipe", "floor", "candidate")


@dataclass(frozen=True)
class WorkItem:
    """One unit of work. `assignment` lists the (layer, bits) palettized together;
    `linear8` quantizes every candidate with per-channel int8 instead (the baseline). Phase
    ``floor``: `layer`'s float16 weight moved by `position` ulps (None: 1; ``floor_probe_weight``),
    a perturbation too small to matter that still changes every output of the layer: the
    evaluation's own noise floor; ``candidate``: a recipe measured by the refinement, like ``recipe``."""

    key: str
    phase: str
    bits: int | None = None
    layer: str | None = None
    position: int | None = None
    assignment: tuple[tuple[str, int], ...] = ()
    linear8: bool = False
    name: str | None = None  # baseline name or recipe key

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"unknown phase {self.phase!r}")


@dataclass(frozen=True)
class EvaluatorSettings:
    """How an evaluator outside the search's pool (the Core ML worker's) measures, as the
    search's own evaluators do: its signal protocol, compute precision and candidate threshold."""

    signal: SignalSpec
    precision: str = "auto"
    min_size: int = 0


@dataclass(frozen=True)
class EvalResult:
    key: str
    per_prompt: tuple[float, ...]
    psnr: float
    node: str
    worker: str
    duration_s: float


@dataclass(frozen=True)
class PaletteResult:
    key: str
    layer: str
    bits: int
    palette: object  # workers.palettize.Palette
    node: str
    worker: str
    duration_s: float
