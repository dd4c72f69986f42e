"""Local stand-ins for Apple's 8 COCO photographs (tests have no network): deterministic
photographs-to-be of different sizes and aspect ratios, as PNG files, so the LANCZOS resize to
the search's square resolution does real work, as on Apple's 640-px Flickr images."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

SIZES = ((80, 48), (64, 96), (120, 120))


def image_bytes(count: int = 3) -> tuple[bytes, ...]:
    from PIL import Image

    out = []
    for i in range(count):
        w, h = SIZES[i % len(SIZES)]
        y, x = np.mgrid[0:h, 0:w]
        rng = np.random.default_rng(100 + i)
        base = np.stack([np.sin(x / (5 + i)), np.cos(y / (7 + i)), np.sin((x + y) / 9)], axis=-1)
        pixels = np.clip((base + 1) * 110 + rng.integers(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        out.append(buf.getvalue())
    return tuple(out)


def write_images(folder: Path, count: int = 3) -> Path:
    """``count`` images as ``img0.png``, ``img1.png``, ... (name order is prompt order)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, data in enumerate(image_bytes(count)):
        (folder / f"img{i}.png").write_bytes(data)
    return folder
