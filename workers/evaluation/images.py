"""The images of an image-to-image search (Apple's rule: a pipeline class named ``*Img2Img*``).

Apple's script measures such pipelines on 8 COCO photographs it fetches from Flickr
(`APPLE_IMAGE_URLS`, in its order, one per caption). They are fetched once into the model cache
when the network allows; ``--images DIR`` gives other images (or these, copied by hand onto an
offline machine), one per prompt in name order. Either way each file is stored under its
sha256 in ``<cache>/images/``, the search's config records the digests (so its identity covers
the images), and the bytes travel to every evaluator inside the signal spec: every node decodes
the same files the same way (`workers.evaluation.signal._images`: RGB, LANCZOS to the resolution).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

APPLE_IMAGE_URLS = (  # RANDOM_TEST_IMAGE_DATA of mixed_bit_compression_pre_analysis.py, in order
    "http://farm1.staticflickr.com/106/298138827_19bb723252_z.jpg",
    "http://farm4.staticflickr.com/3772/9666116202_648cd752d6_z.jpg",
    "http://farm3.staticflickr.com/2238/2472574092_f5534bb2f7_z.jpg",
    "http://farm1.staticflickr.com/220/475442674_47d81fdc2c_z.jpg",
    "http://farm8.staticflickr.com/7231/7359341784_4c5358197f_z.jpg",
    "http://farm8.staticflickr.com/7283/8737653089_d0c77b8597_z.jpg",
    "http://farm3.staticflickr.com/2454/3989339438_2f32b76ebb_z.jpg",
    "http://farm1.staticflickr.com/34/123005230_13051344b1_z.jpg",
)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
FETCH_TIMEOUT_S = 15


def _store() -> Path:
    from workers.tiny_models import default_cache_dir

    path = default_cache_dir() / "images"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _keep(data: bytes) -> str:
    """Store ``data`` under its sha256 (atomically) after checking it is an image."""
    import io

    from PIL import Image

    from common.files import atomic_write_bytes

    Image.open(io.BytesIO(data)).verify()
    digest = hashlib.sha256(data).hexdigest()
    path = _store() / digest
    if not path.is_file():
        atomic_write_bytes(path, data)
    return digest


def _fetch(url: str) -> bytes:
    import urllib.request

    with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as response:  # noqa: S310 (Apple's fixed URLs)
        return response.read()


def apple_images() -> tuple[str, ...]:
    """Digests of Apple's 8 photographs: from the cache, else fetched once (ValueError if not)."""
    index = _store() / "apple-coco.txt"
    try:
        digests = tuple(index.read_text().split())
        if len(digests) == len(APPLE_IMAGE_URLS) and all((_store() / d).is_file() for d in digests):
            return digests
    except OSError:
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    try:
        if offline:
            raise OSError("HF_HUB_OFFLINE is set")
        digests = tuple(_keep(_fetch(url)) for url in APPLE_IMAGE_URLS)
    except Exception as exc:
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise ValueError(f"image-to-image pipelines are measured on Apple's 8 COCO photographs, which are not in "
                         f"{_store()} and could not be fetched ({reason}): pass --images DIR") from None
    from common.files import atomic_write_text

    atomic_write_text(index, "\n".join(digests) + "\n")
    return digests


def folder_images(folder: str) -> tuple[str, ...]:
    """Digests of the images in ``folder`` (name order), each stored in the cache."""
    path = Path(folder)
    if not path.is_dir():
        raise ValueError(f"--images: '{folder}' is not a folder")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"--images: no image files ({', '.join(IMAGE_SUFFIXES)}) in '{folder}'")
    try:
        return tuple(_keep(p.read_bytes()) for p in files)
    except Exception as exc:
        raise ValueError(f"--images: cannot read the images in '{folder}': {str(exc).splitlines()[0][:120]}") from None


def search_images(img2img: bool, folder: str | None) -> tuple[str, ...]:
    """The digests a search records: none for text-to-image, else the folder's or Apple's."""
    if not img2img:
        if folder:
            raise ValueError("--images is for image-to-image pipelines (a class named *Img2Img*); "
                             "this model is text-to-image")
        return ()
    return folder_images(folder) if folder else apple_images()


def load_images(digests) -> tuple[bytes, ...]:
    """The stored bytes of ``digests`` (this node's cache, where the search was prepared)."""
    out = []
    for digest in digests:
        try:
            out.append((_store() / digest).read_bytes())
        except OSError:
            raise ValueError(f"image {digest[:12]} of this search is not in {_store()}: "
                             "resubmit with --images DIR") from None
    return tuple(out)
