"""Checking two chunks against the whole they were cut from, as Swift's ``Unet(chunksAt:)`` feeds
them (``chunk`` cuts; this module only reads). Used by the bundle builder after every cut and
by tests on chunks made any other way (e.g. coremltools' ``bisect_model``).
"""
from __future__ import annotations

from collections import Counter

import numpy as np

from workers.coreml.bundle.chunk import SWIFT_READS_FROM_CHUNK1, _main, _nbytes
from workers.coreml.common import CoreMLError, listing, load_mlmodel, read_program, value_digest

def _features(features) -> dict[str, str]:
    """name -> 'FLOAT16 [2, 4, 64, 64]' (the type Swift's MLFeatureDescription would show)."""
    from coremltools.proto import FeatureTypes_pb2

    out = {}
    for f in features:
        kind = f.type.WhichOneof("Type")
        if kind == "multiArrayType":
            arr = f.type.multiArrayType
            out[f.name] = f"{FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name(arr.dataType)} {list(arr.shape)}"
        else:
            out[f.name] = kind or "untyped"
    return out


def _weights(program) -> Counter:
    """Every weight by content (dtype, shape, bytes): float tensor consts, and every const a
    constexpr op decodes (a LUT, its indices, scales)."""
    found = Counter()
    for op in _main(program).operations:
        val = op.outputs[0].val if op.op_type == "const" else None
        if not isinstance(val, np.ndarray) or val.ndim == 0:
            continue
        feeds_constexpr = any(c.op_type.startswith("constexpr") for c in op.outputs[0].child_ops)
        if val.dtype.kind == "f" or feeds_constexpr:
            found[value_digest(val)] += 1
    return found


def weight_bytes(package) -> int:
    """Bytes of every weight const of the package (what the cut balances)."""
    block = _main(read_program(package))
    return sum(_nbytes(op.outputs[0], op.outputs[0].val.size) for op in block.operations
               if op.op_type == "const" and isinstance(op.outputs[0].val, np.ndarray))


def check_chunks(whole, chunk1, chunk2) -> list[str]:
    """What is wrong with ``chunk1`` + ``chunk2`` as Swift's chunked form of ``whole`` (empty: fine).

    Wiring, as Swift feeds them: chunk 1's inputs are inputs of the whole (same types) and include
    ``sample`` / ``time_ids`` where the whole has them; each chunk-2 input is a chunk-1 output
    (checked first, as Swift's merge prefers it) or an input of the whole, same type; chunk 2's
    outputs are the whole's. Weights: the chunks together hold each weight of the whole once.
    """
    try:
        specs = [load_mlmodel(p).get_spec() for p in (whole, chunk1, chunk2)]
        programs = [read_program(p) for p in (whole, chunk1, chunk2)]
    except CoreMLError as exc:
        return [str(exc)]
    (w_in, w_out), (c1_in, c1_out), (c2_in, c2_out) = (
        (_features(s.description.input), _features(s.description.output)) for s in specs)
    problems = []
    for name, kind in c1_in.items():
        if w_in.get(name) != kind:
            problems.append(f"chunk 1 input {name} ({kind}) is not an input of the whole "
                            f"({w_in.get(name, 'absent')})")
    problems += [f"chunk 1 lacks input {name}, whose shape Swift reads from the first chunk"
                 for name in SWIFT_READS_FROM_CHUNK1 if name in w_in and name not in c1_in]
    for name, kind in c2_in.items():
        source, fed = ("chunk 1 output", c1_out[name]) if name in c1_out else ("input of the whole", w_in.get(name))
        if fed is None:
            problems.append(f"chunk 2 input {name} ({kind}) is neither a chunk 1 output nor an input of the whole")
        elif fed != kind:
            problems.append(f"chunk 2 input {name} is {kind} but the {source} is {fed}")
    unused = sorted(set(c1_out) - set(c2_in))
    if unused:
        problems.append(f"chunk 1 outputs no chunk 2 input takes: {listing(unused)}")
    if c2_out != w_out:
        problems.append(f"chunk 2 outputs {c2_out} but the whole outputs {w_out}")
    versions = [int(s.specificationVersion) for s in specs]
    if len(set(versions)) > 1:
        problems.append(f"specification versions differ: whole {versions[0]}, chunks {versions[1]} and {versions[2]}")
    mine, first, second = (_weights(p) for p in programs)
    together = first + second
    if together != mine:
        missing, surplus = sum((mine - together).values()), sum((together - mine).values())
        problems.append(f"weights: {missing} of the whole's {sum(mine.values())} are in neither chunk; the chunks "
                        f"hold {surplus} more (in both chunks, or not the whole's)")
    return problems
