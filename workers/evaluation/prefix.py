"""Prefix reuse: an evaluation resumes the denoiser's forward at the first module it changes.

Written here for a UNet; a transformer denoiser (SD3, Flux, PixArt) is the same walk over its
``named_modules``: its direct children (``pos_embed``, ``time_text_embed``,
``context_embedder``, ...) and every ``transformer_blocks.k`` / ``single_transformer_blocks.k``
are the checkpoints, and a block that runs after the first changed one is never replayed.

Only some UNet weights change in an evaluation, and everything the UNet computes before the
first changed module runs is the reference run's computation on the reference run's inputs.
So the reference run records the outputs of *checkpoint* modules, and an evaluation replays the
checkpoints that finished before its first changed module started instead of running them.

Checkpoints (memory is bounded by their count): the UNet's direct children (``time_embedding``,
``add_embedding``, ``conv_in``, ...), every top-level block (``down_blocks.i``, ``mid_block``,
``up_blocks.i``), their parts (``resnets.j``, ``attentions.j``, ``downsamplers.0``,
``upsamplers.0``) and the transformer layers inside them (``transformer_blocks.k``), i.e. every
element of a ``ModuleList`` at most three list indices deep. A block's own glue (the skip
tensors it hands on, the UNet's ``down_block_res_samples`` bookkeeping) still runs: a replayed
down block returns its cached ``(hidden_states, res_samples)`` and the UNet's forward goes on
as written, so CFG batching, the scheduler step and everything after the resume point are the
pipeline's own code. The output is therefore bit-identical to a full forward on a
deterministic device (tests: CPU fp32, both tiny models).

The reference run records, per pipeline call, only the first UNet call (the first denoising
step): later steps see latents the changed weights already moved. It also records the
execution order of every module (first start, last end), from which ``plan`` finds the
checkpoints to replay: those that ended before the first changed module started.

The checkpoints' ``forward`` is replaced by a dispatcher (an instance attribute). ``detached``
takes them off for a moment, e.g. while the pipeline is deep-copied (Apple's ``original``).
With ``compile=True`` the leaf checkpoints (those with no checkpoint inside) run through
``torch.compile``; weights are then swapped with ``copy_`` so nothing recompiles.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterable

import torch
from torch import nn

MAX_LIST_DEPTH = 3
COMPILE_BACKEND = os.environ.get("MBP_SEARCH_COMPILE_BACKEND", "inductor")  # tests use "eager"


def checkpoint_names(denoiser: nn.Module) -> list[str]:
    """The modules whose outputs are cached, in ``named_modules`` order."""
    out = []
    for name, module in denoiser.named_modules():
        if not name or isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            continue
        parts = name.split(".")
        depth = sum(p.isdigit() for p in parts)
        if (len(parts) == 1) or (parts[-1].isdigit() and depth <= MAX_LIST_DEPTH):
            out.append(name)
    return out


class PrefixCache:
    """Records checkpoint outputs during the reference run and replays them in evaluations."""

    def __init__(self, denoiser: nn.Module, *, reuse: bool = True, compile: bool = False):
        self.denoiser, self.reuse = denoiser, reuse
        self.names = checkpoint_names(denoiser)
        self.modules = {n: denoiser.get_submodule(n) for n in self.names}
        leaves = [n for n in self.names if not any(o.startswith(n + ".") for o in self.names)]
        self._eager = {n: m.forward for n, m in self.modules.items()}  # the class's forward, bound
        self._run = dict(self._eager)
        self.compiled = compile
        if compile:
            for n in leaves:
                self._run[n] = torch.compile(self._eager[n], dynamic=False, backend=COMPILE_BACKEND)
        self.eager = False  # run the uncompiled forwards (the ordering pass hooks every module)
        self.mode = "off"  # "off" | "record" | "replay"
        self.outputs: dict[int, dict[str, object]] = {}  # pipeline call -> checkpoint -> output
        self.skip: frozenset[str] = frozenset()
        self.start: dict[str, int] = {}  # module -> first start (event counter), first UNet call
        self.end: dict[str, int] = {}  # module -> last end
        self.calls: dict[str, int] = {}  # checkpoint -> calls within one UNet call
        self.call = 0  # current pipeline call
        self.step = 0  # UNet calls so far in the current pipeline call
        self._hooks: list = []
        self._attach()

    # -- installation -------------------------------------------------------------------
    def _attach(self) -> None:
        for name, module in self.modules.items():
            module.forward = self._dispatcher(name)
        self._hooks.append(self.denoiser.register_forward_hook(self._after_denoiser))

    def _detach(self) -> None:
        for module in self.modules.values():
            module.__dict__.pop("forward", None)
        for h in self._hooks:
            h.remove()
        self._hooks = []

    @contextlib.contextmanager
    def detached(self):
        """The plain modules (e.g. for ``copy.deepcopy``: a copy must not call back into this one)."""
        self._detach()
        try:
            yield
        finally:
            self._attach()

    def _dispatcher(self, name: str):
        def forward(*args, **kwargs):
            run = self._eager if self.eager else self._run
            if self.step == 0:
                if self.mode == "replay" and name in self.skip:
                    return self.outputs[self.call][name]
                out = run[name](*args, **kwargs)
                if self.mode == "record":
                    self.outputs.setdefault(self.call, {})[name] = out
                    self.calls[name] = self.calls.get(name, 0) + 1
                return out
            return run[name](*args, **kwargs)

        return forward

    def _after_denoiser(self, *_args) -> None:
        self.step += 1

    def before_call(self, index: int) -> None:
        """The signal runner starts pipeline call ``index`` (a batch of prompts)."""
        self.call, self.step = index, 0

    # -- recording ----------------------------------------------------------------------
    @contextlib.contextmanager
    def ordering(self):
        """Around one (eager) run: the execution order of every module, from hooks."""
        self.start, self.end = {}, {}
        counter = [0]

        def pre(name):
            def hook(*_):
                if self.call == 0 and self.step == 0:
                    counter[0] += 1
                    self.start.setdefault(name, counter[0])
            return hook

        def post(name):
            def hook(*_):
                if self.call == 0 and self.step == 0:
                    counter[0] += 1
                    self.end[name] = counter[0]
            return hook

        handles = []
        for name, module in self.denoiser.named_modules():
            if name:
                handles += [module.register_forward_pre_hook(pre(name)), module.register_forward_hook(post(name))]
        self.eager = True
        try:
            yield
        finally:
            self.eager = False
            for h in handles:
                h.remove()

    @contextlib.contextmanager
    def recording(self):
        """Around the reference run: cache the checkpoints' outputs (first UNet call of every
        pipeline call)."""
        self.outputs, self.calls = {}, {}
        self.mode = "record"
        try:
            yield
        finally:
            self.mode = "off"
            if self.calls:  # counted over every pipeline call: per UNet call
                n = len(self.outputs)
                self.calls = {k: v // n for k, v in self.calls.items()}

    # -- replay -------------------------------------------------------------------------
    def plan(self, changed: Iterable[str]) -> frozenset[str]:
        """Checkpoints to replay when the modules ``changed`` (names) have new weights: those
        that ended before the first changed module started. A changed module the forward never
        calls changes nothing."""
        starts = [self.start[c] for c in changed if c in self.start]
        first = min(starts) if starts else float("inf")
        return frozenset(n for n in self.names
                         if self.calls.get(n) == 1 and n in self.end and self.end[n] < first)

    @contextlib.contextmanager
    def replaying(self, changed: Iterable[str]):
        """Around an evaluation whose weights differ from the reference's in ``changed``."""
        if not self.reuse or not self.outputs:
            yield frozenset()
            return
        self.skip, self.mode = self.plan(changed), "replay"
        try:
            yield self.skip
        finally:
            self.mode, self.skip = "off", frozenset()

    def replayed_fraction(self, changed: Iterable[str]) -> float:
        """Share of the modules' execution events a replay skips (a rough work measure)."""
        skip = self.plan(changed)
        total = max(self.end.values(), default=0)
        top = [n for n in skip if not any(n.startswith(o + ".") for o in skip)]
        return sum(self.end[n] - self.start[n] + 1 for n in top) / total if total else 0.0
