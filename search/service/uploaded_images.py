"""Images a remote client sends with `POST /searches` (the ``images`` field) for an image-to-image
search, instead of naming a folder on the server.

Why: ``images_dir`` is a path on the server; a client that could name any folder there could have
the service read (and, once a gallery shows image-to-image outputs, show back) files it was never
meant to see. Over HTTP a folder is accepted only under ``--allow-images-dir``
(`search.service.requests.check_images_dir`); everyone else sends the images themselves.

Each image is standard base64 (no line breaks) of a PNG or JPEG file, checked here: the count, the
decoded size of each and of all, the pixel count, then ``Image.verify()`` and a real decode with
PIL. The accepted set is stored content-addressed under the service's data directory,
``<data_dir>/uploaded-images/<sha256 of the images' digests in order>/NN-<digest>.<ext>``, and the
search is given that folder as its ``images_dir``: the driver reads it exactly as a local
``--images DIR`` (name order = the order sent), and the same images sent twice are the same folder,
so the request is the same search (duplicate and ``resume`` checks work as for any option).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import shutil
import tempfile
from pathlib import Path

MAX_IMAGES = 16                    # one per prompt; Apple's protocol uses 8
MAX_IMAGE_BYTES = 4 * 1024 * 1024  # decoded, per image
MAX_TOTAL_BYTES = 32 * 1024 * 1024  # decoded, all images of one request
MAX_PIXELS = 4096 * 4096           # a small file may still decode to a huge bitmap
FORMATS = {"PNG": ".png", "JPEG": ".jpg"}  # what PIL reports -> the stored file's suffix
UPLOAD_DIR = "uploaded-images"
MAX_BODY_BYTES = 48 * 1024 * 1024  # a POST /searches body: base64 of the total (~43 MiB) and the rest
LIMITS_TEXT = (f"at most {MAX_IMAGES} images, {MAX_IMAGE_BYTES // 2**20} MiB each and {MAX_TOTAL_BYTES // 2**20} "
               f"MiB in all (decoded), {MAX_PIXELS // 2**20} megapixels each, PNG or JPEG")


class ImageRefused(ValueError):
    """One line: which image and why (the service answers it as 422)."""


def _encoded_limit(n_bytes: int) -> int:
    return 4 * ((n_bytes + 2) // 3)


def check_image(data: bytes, name: str) -> str:
    """The stored suffix of one image's bytes, or ImageRefused: its size, then PIL's ``verify()``
    (structure, checksums) and a full decode of a fresh handle (``verify`` leaves the image unusable)."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > MAX_IMAGE_BYTES:
        raise ImageRefused(f"{name} is larger than {MAX_IMAGE_BYTES // 2**20} MiB")
    if not data:
        raise ImageRefused(f"{name} is empty")
    try:
        with Image.open(io.BytesIO(data)) as im:
            kind = im.format
            if kind not in FORMATS:
                raise ImageRefused(f"{name} is {kind or 'an unknown format'}; send PNG or JPEG")
            if im.width * im.height > MAX_PIXELS:
                raise ImageRefused(f"{name} is {im.width}x{im.height} pixels, more than {MAX_PIXELS // 2**20} "
                                   "megapixels")
            im.verify()
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except ImageRefused:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise ImageRefused(f"{name} is not a readable PNG or JPEG image ({reason})") from None
    return FORMATS[kind]


def decode_images(texts: list[str]) -> list[tuple[bytes, str]]:
    """The request's base64 strings -> (bytes, suffix) per image, every limit checked before anything
    is stored. Sizes are checked on the encoded length first, so no oversized string is decoded."""
    if not texts:
        raise ImageRefused("images: give at least one image")
    if len(texts) > MAX_IMAGES:
        raise ImageRefused(f"images: {len(texts)} images, at most {MAX_IMAGES} are accepted")
    out, total = [], 0
    for i, text in enumerate(texts):
        name = f"images[{i}]"
        if len(text) > _encoded_limit(MAX_IMAGE_BYTES):
            raise ImageRefused(f"{name} is larger than {MAX_IMAGE_BYTES // 2**20} MiB")
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ImageRefused(f"{name} is not valid base64 (standard alphabet, no line breaks)") from None
        total += len(data)
        if total > MAX_TOTAL_BYTES:
            raise ImageRefused(f"images: more than {MAX_TOTAL_BYTES // 2**20} MiB in all")
        out.append((data, check_image(data, name)))
    return out


def store_images(images: list[tuple[bytes, str]], data_dir: Path) -> Path:
    """Write the checked images into their content-addressed folder (once: a folder that exists is
    complete, since it appears by one atomic rename) and return it."""
    digests = [hashlib.sha256(data).hexdigest() for data, _ in images]
    set_digest = hashlib.sha256("\n".join(digests).encode()).hexdigest()
    root = Path(data_dir) / UPLOAD_DIR
    folder = root / set_digest
    if folder.is_dir():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=root))
    try:
        for i, ((data, suffix), digest) in enumerate(zip(images, digests)):
            (staging / f"{i:02d}-{digest}{suffix}").write_bytes(data)
        try:
            os.rename(staging, folder)
        except OSError:
            if not folder.is_dir():  # another request stored the same set first: theirs is the same bytes
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def encode_folder(folder: Path) -> list[str]:
    """What `search submit --images DIR --server URL` sends: the folder's image files (the names and
    order a local search reads, `workers.evaluation.images.IMAGE_SUFFIXES`), base64, each checked
    here first so a bad file is named by its path before anything is sent."""
    from workers.evaluation.images import IMAGE_SUFFIXES

    if not folder.is_dir():
        raise ImageRefused(f"--images: '{folder}' is not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ImageRefused(f"--images: no image files ({', '.join(IMAGE_SUFFIXES)}) in '{folder}'")
    if len(files) > MAX_IMAGES:
        raise ImageRefused(f"--images: {len(files)} images in '{folder}'; a server accepts at most {MAX_IMAGES}")
    out, total = [], 0
    for path in files:
        if path.stat().st_size > MAX_IMAGE_BYTES:
            raise ImageRefused(f"--images: '{path}' is larger than {MAX_IMAGE_BYTES // 2**20} MiB")
        data = path.read_bytes()
        total += len(data)
        if total > MAX_TOTAL_BYTES:
            raise ImageRefused(f"--images: the images in '{folder}' are more than {MAX_TOTAL_BYTES // 2**20} MiB "
                               "in all")
        check_image(data, f"--images: '{path}'")
        out.append(base64.b64encode(data).decode("ascii"))
    return out


__all__ = ["ImageRefused", "LIMITS_TEXT", "MAX_BODY_BYTES", "MAX_IMAGES", "MAX_IMAGE_BYTES", "MAX_PIXELS",
           "MAX_TOTAL_BYTES", "check_image", "decode_images", "encode_folder", "store_images"]
