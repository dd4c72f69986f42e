"""A search's stored palettes read back: the exact LUTs it measured, or a one-line error."""
from __future__ import annotations

from storage import PaletteInfo
from storage.palette_store import PaletteStore
from workers.palette_formats import GroupedPalette, load_palette
from workers.palettize import Palette, PaletteError


def load_stored_palette(store: PaletteStore, info: PaletteInfo) -> Palette | GroupedPalette:
    """The palette file ``info`` points to, checked against the digest stored with it.

    Raises PaletteError (one line, saying what to restore) when the file is missing, corrupt or
    holds another palette: a search never goes on with LUTs other than the ones it measured.
    """
    path = store.path(info.path)
    if not path.exists():
        raise PaletteError(f"palette file {path} is missing; restore the {store.root} folder")
    try:
        palette = load_palette(path)
    except PaletteError as exc:  # corrupt
        raise PaletteError(f"{exc}; restore the {store.root} folder") from None
    if palette.digest != info.digest:
        raise PaletteError(f"palette file {path} does not match the stored digest; restore the {store.root} "
                           "folder or start a new search")
    return palette
