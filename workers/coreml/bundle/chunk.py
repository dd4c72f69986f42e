"""The denoiser in two chunks, as Swift's ``Unet(chunksAt:)`` loads them (Apple's ``--chunk-unet``).

Why: iOS cannot load a whole SDXL UNet at once, so Apple's converter cuts the ML program in two
of about equal weight size. Swift (``ManagedMLModel.swift``, ``Array.predictions(from:)``) runs
chunk 1 on the pipeline's inputs, then chunk 2 on chunk 1's outputs merged over those same
inputs (chunk 1's output wins a name clash), and reads chunk 2's first output as the noise. It
reads ``sample`` (and SDXL's ``time_ids``) shapes from chunk 1. So chunk 2's inputs are chunk 1's
outputs (by var name) plus the original inputs it still uses; chunk 2's outputs are the whole's.

Why not ``coremltools.models.utils.bisect_model`` (what Apple's script calls): it names the
packages ``<name>_chunk1/2``; it casts every float16 tensor crossing the cut to float32 (two
extra casts and twice the bytes per crossing per step); it re-runs the 90-pass default pipeline
on each chunk; and it picks the first single-consumer op after half the weight bytes *declared*
in op order (a const counts where it is declared; from iOS 18 on, a 4-bit index counts a byte).
Here the cut is chosen where the weights are *used*: no weight is needed on both sides, the
weight bytes are as equal as the graph allows (within 1 % of the total), and among those cuts
the fewest bytes cross. The chunks are serialised with no optimisation pass, so every weight,
LUT and index array is carried bit for bit, and float16 tensors cross as float16.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import first_line
from common.files import publish_dir
from workers.coreml.common import ERROR_CHARS, CoreMLError, listing, load_mlmodel, quiet_coremltools, read_program

log = logging.getLogger(__name__)
SWIFT_READS_FROM_CHUNK1 = ("sample", "time_ids")  # Unet.swift: models.first!.modelDescription.inputDescriptionsByName
BALANCE_STEP = 0.01  # cuts whose weight split differs by less than this share of the total count as equal


@dataclass(frozen=True)
class Cut:
    """Where the program is cut: compute ops ``[0, index)`` form chunk 1, the rest chunk 2."""

    index: int
    chunk1_bytes: int  # weight bytes only chunk 1 uses
    total_bytes: int
    shared_bytes: int  # weight bytes both sides use (they would be stored twice); 0 when possible
    crossing: tuple[str, ...]  # vars chunk 1 outputs and chunk 2 takes, in producer order
    crossing_bytes: int

    @property
    def ratio(self) -> float:
        """Chunk 1's share of the weight bytes."""
        return self.chunk1_bytes / self.total_bytes


# -- choosing the cut ----------------------------------------------------------------------------
def _is_const(op) -> bool:
    return op.op_type.startswith("const")  # const and constexpr_* (compressed weights, decoded at load)


def _top(op, block):
    """The op of ``block`` that holds ``op`` (itself, or a cond / while_loop around it)."""
    while op.enclosing_block is not block:
        op = op.enclosing_block.outer_op
    return op


def _uses(var, block, pos: dict[int, int]) -> list[int]:
    """Positions of the compute ops that use ``var`` (through constexpr ops for a weight);
    ``len(pos)`` stands for the program's outputs."""
    found = [len(pos)] if any(var is out for out in block.outputs) else []
    for child in var.child_ops:
        top = _top(child, block)
        if _is_const(top):
            for out in top.outputs:
                found += _uses(out, block, pos)
        else:
            found.append(pos[id(top)])
    return found


def _nbytes(var, count: int) -> int:
    """Bytes of ``count`` elements of ``var``'s type (packed: 4-bit indices take half a byte each)."""
    bits = var.dtype.get_bitwidth() if hasattr(var.dtype, "get_bitwidth") else 8
    return -(-count * int(bits) // 8)


def _can_cross(var) -> bool:
    """A tensor with a fixed shape can be a model output and input; other values cannot."""
    from coremltools.converters.mil.mil import types

    return types.is_tensor(var.sym_type) and all(isinstance(d, (int, np.integer)) for d in var.shape)


def _main(program):
    if set(program.functions) != {"main"}:
        raise CoreMLError(f"only a single-function ML program can be chunked, this one has functions "
                          f"{listing(sorted(program.functions))}")
    return program.functions["main"]


def plan_cut(program) -> Cut:
    """The cut of ``program`` (a MIL program): no weight on both sides if any cut allows it (a
    const is shared only where the converter deduplicated identical weights), then the most
    equal weight bytes (in steps of BALANCE_STEP of the total), then the fewest bytes crossing.
    Prefix sums over the compute ops: one pass, whatever the program's size."""
    block = _main(program)
    compute = [op for op in block.operations if not _is_const(op)]
    pos = {id(op): i for i, op in enumerate(compute)}
    n = len(compute)
    mine, shared, cross, crossed, bad = (np.zeros(n + 2, dtype=np.int64) for _ in range(5))
    for op in block.operations:  # weights: needed on the side(s) of the ops that use them
        if op.op_type != "const" or not isinstance(op.outputs[0].val, np.ndarray):
            continue
        used = _uses(op.outputs[0], block, pos)
        if used:
            size = _nbytes(op.outputs[0], op.outputs[0].val.size)
            mine[max(used) + 1] += size  # in chunk 1 alone once the cut is after its last use
            shared[min(used) + 1] += size
            shared[max(used) + 1] -= size
    for i, op in enumerate(compute):  # tensors produced at i and used up to j cross cuts i+1..j
        for var in op.outputs:
            used = _uses(var, block, pos)
            if used and max(used) > i:
                size = _nbytes(var, int(np.prod(var.shape))) if _can_cross(var) else 0
                for arr, value in ((cross, size), (crossed, 1), (bad, 0 if _can_cross(var) else 1)):
                    arr[i + 1] += value
                    arr[max(used) + 1] -= value
    mine, shared, cross, crossed, bad = (np.cumsum(a) for a in (mine, shared, cross, crossed, bad))
    total = int(mine[n + 1])
    if total == 0:
        raise CoreMLError("the ML program holds no weights to split between two chunks")
    # outputs come from chunk 2: the cut lies at or before the first op producing one
    last = min((pos[id(v.op)] for v in block.outputs if v.op is not None and id(v.op) in pos), default=n)
    cuts = [k for k in range(1, min(last, n - 1) + 1) if crossed[k] > 0 and bad[k] == 0]
    if not cuts:
        raise CoreMLError("no place to cut the ML program in two: every cut passes a value that is not a "
                          "fixed-shape tensor between the chunks")
    k = min(cuts, key=lambda k: (shared[k] > 0, round(abs(mine[k] - total / 2) / (BALANCE_STEP * total)), shared[k],
                                 cross[k], k))
    names = tuple(v.name for op in compute[:k] for v in op.outputs
                  if any(u >= k for u in _uses(v, block, pos)))
    return Cut(k, int(mine[k]), total, int(shared[k]), names, int(cross[k]))


# -- building the chunks ---------------------------------------------------------------------------
def _chunk1(program, cut: Cut):
    """Chunk 1: the program up to the cut, returning the crossing tensors; it keeps every input
    of the whole (Swift feeds them all and reads ``sample`` / ``time_ids`` shapes from it)."""
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY

    block = _main(program)
    by_name = {v.name: v for op in block.operations for v in op.outputs}
    block.outputs.clear()
    block.set_outputs([by_name[name] for name in cut.crossing])
    PASS_REGISTRY["common::dead_code_elimination"](program)
    return program


def _chunk2(program, cut: Cut):
    """Chunk 2: every crossing tensor becomes an input of the same name, type and shape; what
    only chunk 1 needed, inputs included, goes."""
    from coremltools.converters.mil.mil import Placeholder
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY

    block = _main(program)
    by_name = {v.name: v for op in block.operations for v in op.outputs}
    for name in cut.crossing:
        old = by_name[name]
        new = Placeholder(old.shape, dtype=old.dtype, name=name).outputs[0]
        block._input_dict[name] = new
        # every use, chunk 1's too: those ops then feed nothing and dead-code elimination drops them
        block.replace_uses_of_var_after_op(anchor_op=None, old_var=old, new_var=new, force_replace=True)
    block.function_inputs = tuple(block._input_dict.values())
    PASS_REGISTRY["common::dead_code_elimination"](program)
    kept = OrderedDict((k, v) for k, v in block._input_dict.items()
                       if v.child_ops or any(v is out for out in block.outputs))
    block._input_dict = kept
    block.function_inputs = tuple(kept.values())
    return program


def _to_model(program, spec_version: int, whole):
    """Serialise without optimisation passes: the program is already optimised, and a pass could
    rewrite a weight. (The backend still adapts I/O types, e.g. float16 to float32 before spec 7.)"""
    import coremltools as ct
    from coremltools.converters.mil.converter import mil_convert

    model = mil_convert(program, convert_from="milinternal", convert_to="mlprogram",
                        compute_units=ct.ComputeUnit.CPU_ONLY, specification_version=spec_version,
                        skip_model_load=True, pass_pipeline=ct.PassPipeline.EMPTY)
    for field in ("short_description", "author", "license", "version"):
        setattr(model, field, getattr(whole, field))
    for key, value in whole.user_defined_metadata.items():
        model.user_defined_metadata.setdefault(key, value)  # coremltools' own version keys stay the new ones
    return model


def chunk_package(package, out_dir, base_name: str) -> tuple[Path, Path]:
    """Write ``<base_name>Chunk1.mlpackage`` and ``<base_name>Chunk2.mlpackage`` in ``out_dir`` from the
    ML program at ``package`` (float16, palettized or not); both appear only once both are built."""
    quiet_coremltools()
    package, out_dir = Path(package), Path(out_dir)
    paths = (out_dir / f"{base_name}Chunk1.mlpackage", out_dir / f"{base_name}Chunk2.mlpackage")
    whole = load_mlmodel(package)
    version = int(whole.get_spec().specificationVersion)
    try:
        program = read_program(package)
        cut = plan_cut(program)
        chunks = (_chunk1(program, cut), _chunk2(read_program(package), cut))
        models = [_to_model(c, version, whole) for c in chunks]
    except CoreMLError:
        raise
    except Exception as exc:
        raise CoreMLError(f"cannot cut {package.name} in two chunks: {first_line(exc, ERROR_CHARS)}") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{base_name}-chunks-", dir=out_dir))
    try:
        for model, path in zip(models, paths):
            model.save(str(tmp / path.name))
        for path in paths:
            publish_dir(tmp / path.name, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("%s cut after compute op %d: chunk 1 holds %.1f %% of %d weight bytes, %d tensors (%d bytes) cross",
             package.name, cut.index, 100 * cut.ratio, cut.total_bytes, len(cut.crossing), cut.crossing_bytes)
    return paths
