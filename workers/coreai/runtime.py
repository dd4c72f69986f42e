"""Run an exported denoiser ``.aimodel`` on the Core AI runtime inside the search's own signal run.

On Linux ``coreai-core`` ships a CPU runtime (accuracy only: speed and memory need a Mac). The
asset stands in for the denoiser's ``forward`` (as ``workers.coreml.validate.CoreMLDenoiser``
does for Core ML): every call the pipeline makes is bound to the denoiser's signature, renamed
to Apple's input names, cut into the asset's batch, run, and handed back as a torch tensor, so the
PSNR against the search's own diffusers reference (its precision: float16 on a GPU, float32 on
CPU) is measured exactly as the search measured it.
"""
from __future__ import annotations

import asyncio
import inspect
from pathlib import Path

import numpy as np
import torch

from workers.coreai import CoreAIError
from workers.coreml.call_inputs import flatten_call

_RENAMED = {"hidden_states": "sample"}  # SD3's transformer argument -> Apple's input name


class LoadedAsset:
    """An ``.aimodel`` loaded for inference (its ``main`` function), usable from plain code."""

    def __init__(self, path: str | Path):
        from coreai.authoring import AIModelAsset

        self.loop = asyncio.new_event_loop()
        self._cm = AIModelAsset.load(str(path)).executable()
        model = self.loop.run_until_complete(self._cm.__aenter__())
        self.function = model.load_function("main")
        desc = self.function.desc
        self.inputs = {n: (tuple(desc.input_descriptor(n).shape), np.dtype(desc.input_descriptor(n).dtype))
                       for n in desc.input_names}
        self.outputs = list(desc.output_names)

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from coreai.runtime import NDArray

        arrays = {k: NDArray(np.ascontiguousarray(v, dtype=self.inputs[k][1])) for k, v in feeds.items()}
        out = self.loop.run_until_complete(self.function(arrays))
        return {k: np.array(v.numpy()) for k, v in out.items()}

    def close(self) -> None:
        try:
            self.loop.run_until_complete(self._cm.__aexit__(None, None, None))
        finally:
            self.loop.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class CoreAIDenoiser:
    """Stands in for the denoiser's ``forward``: each call runs on the Core AI runtime."""

    def __init__(self, asset: LoadedAsset, forward):
        self.asset, self.signature = asset, inspect.signature(forward)
        self.calls = 0

    def _feeds(self, call) -> dict[str, np.ndarray]:
        feeds = {_RENAMED.get(n, n): a for n, a in call.feeds().items()}
        missing = sorted(set(self.asset.inputs) - set(feeds))
        if missing:
            raise CoreAIError(f"the Core AI denoiser needs inputs the pipeline does not give: {', '.join(missing)}")
        return {n: feeds[n] for n in self.asset.inputs}

    def __call__(self, *args, **kwargs):
        call = flatten_call(self.signature, args, kwargs)
        feeds = self._feeds(call)
        batch = next(a for n, a in feeds.items() if n != "timestep").shape[0]
        step = self.asset.inputs["sample"][0][0]
        outs = []
        for start in range(0, batch, step):
            n = min(step, batch - start)
            chunk = {}
            for name, (shape, _dtype) in self.asset.inputs.items():
                x = np.asarray(feeds[name])
                if name == "timestep":
                    x = np.broadcast_to(x.reshape(-1)[:1] if x.size == 1 else x[start:start + n], (n,))
                else:
                    x = x[start:start + n]
                if n < step:  # the asset's batch is fixed: pad with the last row, cut after
                    x = np.concatenate([x, np.repeat(x[-1:], step - n, axis=0)])
                chunk[name] = x
            outs.append(self.asset(chunk)[self.asset.outputs[0]][:n].astype(np.float32))
            self.calls += 1
        like = next(t for t in (*args, *kwargs.values()) if torch.is_tensor(t))
        out = torch.from_numpy(np.concatenate(outs)).to(like.device, like.dtype)
        if kwargs.get("return_dict", True):
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=out)
        return (out,)


def measure(ev, asset_path: str | Path) -> tuple[float, tuple[float, ...], int]:
    """(PSNR, per prompt, runtime calls) of the search's signal with the asset as the denoiser,
    against the evaluator's own diffusers reference: the search's protocol."""
    from workers.coreml.validate import run_with_coreml

    with LoadedAsset(asset_path) as asset:
        predictor = CoreAIDenoiser(asset, ev.denoiser.forward)
        out = run_with_coreml(ev, predictor)
    per_prompt, value = ev.score(out, ev.pristine_reference)
    return float(value), tuple(float(p) for p in per_prompt), predictor.calls
