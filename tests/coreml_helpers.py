"""Checks of Core ML packages written by `search apply` (test_coreml_phase.py, test_multinode.py,
test_families_match_reference.py), independent of the code that builds and validates them:

- digests with hashlib, trees compared file by file;
- the package read with coremltools' own API (``MLModel(skip_model_load=True)``, its milproto
  loader, each ``constexpr_lut_to_dense`` op's ``lut``/``indices`` inputs, the iOS16 packed
  indices unpacked by coremltools' ``restore_elements_from_packed_bits`` and the dense weight by
  the op's own ``materialized_val_inference``);
- compared with what the search STORED: the recipe's formats and the palette files listed in
  SQLite (read through the storage API, the ``.npz`` opened with plain numpy), and the float16
  weights of the pipeline loaded by plain diffusers (`tests.reference.apple_serial`).

No function of `workers.coreml` (``layer_luts``, ``check_structure``, the manifest) is used: a
regression there cannot make its own expectation.
"""
from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

LUT_OP = "constexpr_lut_to_dense"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def same_tree(a: Path, b: Path) -> bool:
    files = lambda root: {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}  # noqa: E731
    return files(a) == files(b)


# -- the package, read by coremltools ------------------------------------------------------
@dataclass(frozen=True)
class LutOp:
    """One ``constexpr_lut_to_dense`` as coremltools reads it."""

    name: str
    luts: np.ndarray  # float16 (groups, entries): one row per tensor, or per channel group along axis 0
    indices: np.ndarray  # flat, C order of the weight
    dense: np.ndarray  # coremltools' own decompression (the weight Core ML computes with)


@dataclass(frozen=True)
class Package:
    lut_ops: tuple[LutOp, ...]
    other_compressed: tuple[str, ...]  # constexpr ops that are not LUTs
    float16_digests: frozenset[str]  # sha256 of every float16 const's bytes (C order)


def _fp16_sha(values: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(values, dtype=np.float16).reshape(-1).view(np.uint8)).hexdigest()


def read_package(package: Path) -> Package:
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load
    from coremltools.optimize._utils import restore_elements_from_packed_bits

    logging.getLogger("coremltools").setLevel(logging.ERROR)
    model = ct.models.MLModel(str(package), skip_model_load=True)
    spec = model.get_spec()
    program = milproto_load(spec, spec.specificationVersion, model.weights_dir)

    def walk(block):
        for op in block.operations:
            yield op
            for inner in op.blocks:
                yield from walk(inner)

    luts, others, digests = [], [], set()
    for op in (op for fn in program.functions.values() for op in walk(fn)):
        if op.op_type == LUT_OP:
            lut = np.asarray(op.lut.val)
            dense = np.asarray(op.materialized_val_inference())
            if "shape" in op.inputs:  # iOS16 form: one LUT, indices packed in bytes
                idx = restore_elements_from_packed_bits(op.indices.val, int(np.log2(lut.size)), dense.size)
                rows = lut.reshape(1, -1)
            else:  # iOS18 form: lut (groups along axis 0, 1, ..., entries, vector size 1)
                assert int(np.prod(lut.shape[1:-2])) == 1 and lut.shape[-1] == 1, (op.name, lut.shape)
                idx, rows = np.asarray(op.indices.val), lut.reshape(lut.shape[0], lut.shape[-2])
            luts.append(LutOp(op.name, rows, np.asarray(idx).reshape(-1), dense))
        elif op.op_type.startswith("constexpr_"):
            others.append(op.name)
        elif op.op_type == "const":
            val = getattr(op.outputs[0].val, "val", op.outputs[0].val)
            if isinstance(val, np.ndarray) and val.dtype == np.float16 and val.size:
                digests.add(_fp16_sha(val))
    return Package(tuple(luts), tuple(others), frozenset(digests))


# -- what the search stored ----------------------------------------------------------------
@dataclass(frozen=True)
class Stored:
    recipe_key: str
    bits: dict  # layer -> the recipe's format (bits, group_size)
    psnr: float | None  # the recipe's measured end-to-end PSNR
    per_prompt: tuple[float, ...] | None
    palettes: dict  # (layer, format) -> {"lut": (groups, entries) float16, "code": (groups, 65536) uint8}
    model_location: str
    config: dict


def _package_stem(key: str) -> str:
    """The package's file name for a recipe key, as documented for `search apply` (unsafe -> _)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", key) or "recipe"


def stored_for(package: Path, db: Path, search_id: str) -> Stored:
    """The recipe this package was made from (by its file name) with its stored palettes."""
    from storage import Storage
    from storage.palette_store import PaletteStore

    stem = Path(package).name.removesuffix(".mlpackage")
    with Storage(db) as st:
        search = st.get_search(search_id)
        recipes = [r for r in st.recipes(search_id) if _package_stem(r.key) == stem]
        assert len(recipes) == 1, f"{stem}: {len(recipes)} stored recipes have this package name"
        recipe, infos = recipes[0], st.palettes(search_id)
    store, palettes = PaletteStore(db), {}
    for key, info in infos.items():
        with np.load(store.path(info.path), allow_pickle=False) as z:
            palettes[key] = {"lut": np.asarray(z["lut"], dtype=np.float16).reshape(-1, 1 << key[1].bits),
                             "code": np.asarray(z["code"]).reshape(-1, 1 << 16)}
    return Stored(recipe.key, dict(recipe.bits), recipe.psnr, recipe.per_prompt, palettes, search.model_location,
                  search.config)


@lru_cache(maxsize=4)
def float16_weights(model_location: str) -> dict[str, np.ndarray]:
    """{module name: float16 weight} of every Linear/Conv2d of the denoiser, loaded by diffusers."""
    import torch

    from tests.reference.apple_serial import denoiser, load_pipeline

    net = denoiser(load_pipeline(model_location))
    return {name: m.weight.detach().numpy().astype(np.float16) for name, m in net.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


def match_ops(ops, weights: dict[str, np.ndarray]) -> dict[str, LutOp]:
    """Each LUT op -> the recipe layer whose own float16 weight it is nearest to (same element
    count, least squared difference): names are never used, and a wrong LUT still finds its layer."""
    out: dict[str, LutOp] = {}
    for op in ops:
        same = {layer: w for layer, w in weights.items() if w.size == op.dense.size}
        assert same, f"{op.name}: no recipe layer has {op.dense.size} elements"
        d = op.dense.astype(np.float64).reshape(-1)
        err = sorted((float(np.mean((d - w.astype(np.float64).reshape(-1)) ** 2)), layer) for layer, w in same.items())
        assert len(err) == 1 or err[0][0] < err[1][0], f"{op.name}: as near to {err[0][1]} as to {err[1][1]}"
        layer = err[0][1]
        assert layer not in out, f"{op.name} and {out[layer].name} both hold {layer}"
        out[layer] = op
    return out


def check_search_luts(package: Path, db: Path, search_id: str) -> str:
    """Assert that ``package`` holds, for every palettized layer of its stored recipe, one
    ``constexpr_lut_to_dense`` whose LUTs (``2**bits`` entries, bits from the recipe, one per
    channel group for a grouped format) are bit for bit the stored palette's and whose indices are
    that palette's code of each float16 weight; that nothing else is compressed and that every
    recipe layer kept in float16 is still there unchanged. Returns a one-line summary."""
    stored, pkg = stored_for(package, db, search_id), read_package(package)
    weights = {layer: w for layer, w in float16_weights(stored.model_location).items() if layer in stored.bits}
    missing = sorted(set(stored.bits) - set(weights))
    assert not missing, f"recipe layers not in the model: {missing[:5]}"
    palettized = {layer for layer, f in stored.bits.items() if f.bits != 16}
    found = match_ops(pkg.lut_ops, weights)
    assert set(found) == palettized, (f"LUT ops for layers at 16 bits: {sorted(set(found) - palettized)[:5]}; "
                                      f"palettized layers without one: {sorted(palettized - set(found))[:5]}")
    assert not pkg.other_compressed, f"other compressed weights: {pkg.other_compressed[:5]}"
    for layer, op in found.items():
        fmt, w = stored.bits[layer], weights[layer]
        pal = stored.palettes.get((layer, fmt))
        assert pal is not None, f"{layer}: no stored palette at {fmt}"
        groups = w.shape[0] // fmt.group_size if fmt.group_size else 1
        assert op.luts.shape == (groups, 1 << fmt.bits), (layer, str(fmt), op.luts.shape)
        assert op.luts.dtype == np.float16 and np.array_equal(op.luts.view(np.uint16), pal["lut"].view(np.uint16)), \
            f"{layer}: LUT differs from the stored palette's ({fmt})"
        rows = np.ascontiguousarray(w).reshape(groups, -1).view(np.uint16)
        expected = np.stack([pal["code"][g][rows[g]] for g in range(groups)]).reshape(-1)
        assert op.indices.size == w.size and np.array_equal(op.indices.astype(np.int64), expected.astype(np.int64)), \
            f"{layer}: indices differ from the stored palette's code of the weight ({fmt})"
        dense = np.stack([pal["lut"][g][expected.reshape(groups, -1)[g]] for g in range(groups)])
        assert np.array_equal(op.dense.reshape(-1).view(np.uint16), dense.reshape(-1).view(np.uint16)), layer
    kept = [layer for layer in stored.bits if layer not in palettized]
    changed = [layer for layer in kept if _fp16_sha(weights[layer]) not in pkg.float16_digests]
    assert not changed, f"{len(changed)} float16 recipe layers are not in the package unchanged: {changed[:5]}"
    depths = sorted({str(stored.bits[layer]) for layer in found})
    return (f"{len(found)} constexpr_lut_to_dense ops with the search's LUTs and indices (formats "
            f"{', '.join(depths) or 'none'} from the recipe); {len(kept)} float16 recipe layers unchanged")


def decompressed_weights(package: Path, db: Path, search_id: str) -> dict[str, np.ndarray]:
    """{recipe layer: the weight coremltools decompresses from the package}, shaped like the layer."""
    stored, pkg = stored_for(package, db, search_id), read_package(package)
    weights = {layer: w for layer, w in float16_weights(stored.model_location).items() if layer in stored.bits}
    return {layer: op.dense.reshape(weights[layer].shape) for layer, op in match_ops(pkg.lut_ops, weights).items()}


def apple_psnr(ref: np.ndarray, test: np.ndarray) -> float:
    """Apple's ``compute_psnr`` (peak of the test array), in the arrays' dtype, rounded to 0.1 dB."""
    rms = np.sqrt(np.mean((ref - test) ** 2))
    return float(f"{20 * np.log10((np.abs(test).max() + 1e-5) / (rms + 1e-10)):.1f}")


def package_psnr(package: Path, db: Path, search_id: str, runner) -> tuple[list[float], float]:
    """The recipe's end-to-end PSNR recomputed from the package alone: the weights coremltools
    decompresses from it put into a float32 CPU pipeline loaded by diffusers, ``runner`` (an
    `apple_serial.SignalRunner` with the search's prompts, size, steps and images) run on it and on
    the pristine pipeline, per-prompt PSNRs and their plain mean (Apple's protocol)."""
    import copy

    import torch

    from tests.reference.apple_serial import denoiser, load_pipeline

    location = stored_for(package, db, search_id).model_location
    pristine = load_pipeline(location)
    pipe = copy.deepcopy(pristine)
    modules = dict(denoiser(pipe).named_modules())
    for layer, dense in decompressed_weights(package, db, search_id).items():
        weight = modules[layer].weight
        weight.data = torch.from_numpy(np.ascontiguousarray(dense)).to(weight.dtype)
    test, ref = runner(pipe), runner(pristine)
    values = [apple_psnr(r, t) for r, t in zip(ref, test)]
    return values, sum(values) / len(values)
