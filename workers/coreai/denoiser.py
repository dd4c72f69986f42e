"""The denoiser's Core AI asset, as Apple exports it, and its PSNR on the Core AI runtime.

Shared by the bundle (the recipe's asset) and the comparison (Apple's ``4bit`` preset): one
export path for both, so they differ only in how the weights are compressed.
"""
from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch

from workers.coreai import export as ex
from workers.coreai.layout import denoiser_component
from workers.coreai.luts import put_luts


def cpu_half(module):
    return copy.deepcopy(module).to("cpu", torch.float16).eval()


def export_denoiser(ev, ptype: str, hw, luts, path: Path, quantize: bool = False, tokens: int | None = None) -> None:
    """The denoiser as Apple exports it (float16, batch 2), with ``luts`` put in (or the 4bit preset)."""
    comp = denoiser_component(ptype)
    with ev.prefix.detached() if getattr(ev, "prefix", None) is not None else contextlib.nullcontext():
        den = cpu_half(ev.denoiser)
    if luts:
        put_luts(den, luts)
    wrapper, inputs = ex.wrapper_and_inputs(comp, ev.pipe, den, hw, torch.float16, tokens)
    program = ex.to_program(wrapper, inputs, comp)
    if quantize:
        program = ex.quantize_4bit(program)
    ex.save(program, path, f"{comp.asset} component" + (" (4bit preset)" if quantize else ""))


def measure_asset(ev, path: Path):
    from workers.coreai.runtime import measure

    return measure(ev, path)
