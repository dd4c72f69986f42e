"""One call of a denoiser (``pipe.unet`` or ``pipe.transformer``) as the named float32 arrays a
Core ML model takes, and back.

The conversion traces the denoiser with the inputs the search's pipeline really passes (captured
during one signal run), and runtime validation feeds every later call to Core ML the same way. A
call is bound to the denoiser's own ``forward`` signature, so any family works without a list of
its arguments: tensors become inputs (named after the argument; a dict argument's tensors after
their key, as SDXL's ``added_cond_kwargs`` → ``text_embeds``, ``time_ids``), everything else
(``None``, flags, a dict without tensors) is kept as it was and passed again as a constant.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
import torch

SKIPPED = ("return_dict",)  # the Core ML model returns the denoiser's first output


@dataclass(frozen=True)
class DenoiserInputs:
    """Named float32 inputs of one denoiser call, in the order the Core ML model takes them."""

    names: tuple[str, ...]
    arrays: tuple[np.ndarray, ...]
    sources: tuple[tuple[str, str | None], ...] = ()  # each input's (argument, key of a dict argument)
    static: tuple[tuple[str, object], ...] = ()  # the call's other arguments, passed as they were

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(int(d) for d in a.shape) for n, a in zip(self.names, self.arrays)}

    def feeds(self) -> dict[str, np.ndarray]:
        return dict(zip(self.names, self.arrays))

    def call_kwargs(self, tensors) -> dict:
        """The keyword arguments of the denoiser call with ``tensors`` in the inputs' places."""
        kwargs = {name: dict(value) if isinstance(value, dict) else value for name, value in self.static}
        for (arg, key), t in zip(self.sources, tensors):
            if key is None:
                kwargs[arg] = t
            else:
                kwargs.setdefault(arg, {})[key] = t
        return kwargs


def flatten_call(forward, args, kwargs) -> DenoiserInputs:
    """Bind ``forward(*args, **kwargs)`` to its signature and split tensors from the rest.
    ``forward`` may be given as its `inspect.Signature` (callers feeding every call keep one)."""
    signature = forward if isinstance(forward, inspect.Signature) else inspect.signature(forward)
    bound = signature.bind_partial(*args, **kwargs).arguments
    names, tensors, sources, static = [], [], [], []

    def add(name: str, source: tuple[str, str | None], t: torch.Tensor) -> None:
        names.append(name if name not in names else f"{source[0]}_{name}")
        tensors.append(t)
        sources.append(source)

    for arg, value in bound.items():
        if arg in SKIPPED:
            continue
        if arg == "timestep" and isinstance(value, (int, float)):
            value = torch.tensor(float(value))
        if torch.is_tensor(value):
            add(arg, (arg, None), value)
        elif isinstance(value, dict) and any(torch.is_tensor(v) for v in value.values()):
            rest = {k: v for k, v in value.items() if not torch.is_tensor(v)}
            if rest:
                static.append((arg, rest))
            for key, v in value.items():
                if torch.is_tensor(v):
                    add(key, (arg, key), v)
        else:
            static.append((arg, value))
    if not tensors:
        raise ValueError("the denoiser call has no tensor argument")
    batch = tensors[0].shape[0] if tensors[0].ndim else 1
    arrays = []
    for (arg, _), t in zip(sources, tensors):
        t = t.detach().to("cpu", torch.float32)
        if arg == "timestep" and t.numel() == 1:  # one step for the whole batch: Core ML takes it per sample
            t = t.reshape(-1).expand(batch)
        arrays.append(np.ascontiguousarray(t.numpy()))
    return DenoiserInputs(tuple(names), tuple(arrays), tuple(sources), tuple(static))
