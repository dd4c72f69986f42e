"""Checks of Core ML packages that came back from a Core ML node (test_coreml_phase.py and
test_multinode.py): digests with hashlib, trees compared file by file, and every LUT and index
against the search's stored palettes through `workers.coreml.validate.check_structure`."""
from __future__ import annotations

import hashlib
from pathlib import Path


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def same_tree(a: Path, b: Path) -> bool:
    files = lambda root: {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}  # noqa: E731
    return files(a) == files(b)


def check_search_luts(package: Path, db: Path, search_id: str) -> str:
    """Structural check of ``package`` against the search's stored palettes (every palettized
    layer's LUT and indices exactly the search's, every other weight the base model's); returns
    the check's detail. The base model is read where the package's manifest says it is."""
    from common.formats import is_palettized
    from storage import Storage
    from storage.palette_store import PaletteStore
    from workers.coreml.apply import layer_luts, read_manifest, torch_weights
    from workers.coreml.common import LayerMatch, describe_program, read_program
    from workers.coreml.validate import check_structure
    from workers.models import load_denoiser, resolve_model
    from workers.palettize import load_palette

    with Storage(db) as st:
        palettes = {k: load_palette(PaletteStore(db).path(v.path)) for k, v in st.palettes(search_id).items()}
        model = st.get_search(search_id).model
    m = read_manifest(package)
    unet = load_denoiser(resolve_model(model))
    luts = layer_luts(torch_weights(unet, list(m.layers)), m.bits,
                      {l: LayerMatch(l, c, ()) for l, c in m.layers.items()}, palettes)
    base_consts, _ = describe_program(read_program(m.base_mlpackage))
    result, _ = check_structure(read_program(package), base_consts, luts, "search's")
    assert result.ok, result.detail
    assert set(m.layers) == {layer for layer, b in m.bits.items() if is_palettized(b)}  # none: a float16 recipe
    return result.detail
