"""The images of image-to-image searches: stored by digest, shipped as bytes, decoded the same
way on every node, and equal to the serial reference's decoding of Apple's call (RGB, LANCZOS)."""
from __future__ import annotations

import pickle

import numpy as np
import pytest

from tests.reference.apple_serial import decode_images
from tests.reference.local_images import image_bytes, write_images
from workers.evaluation import images
from workers.evaluation.signal import SignalSpec, _images


def test_folder_images_roundtrip_through_the_spec(model_cache, tmp_path):
    digests = images.search_images(True, str(write_images(tmp_path / "in", 3)))
    assert len(digests) == 3 and len(set(digests)) == 3
    data = images.load_images(digests)
    assert data == image_bytes(3)
    # what an evaluator on another node receives: the pickled spec, decoded there
    spec = pickle.loads(pickle.dumps(SignalSpec(prompts=("a", "b", "c", "d"), images=data)))
    ours = _images(spec.images, 4, 64)
    ref = decode_images(image_bytes(3), 64)
    for i, image in enumerate(ours):  # prompt i gets image i % 3
        assert image.size == (64, 64) and np.array_equal(np.asarray(image), np.asarray(ref[i % 3]))
    assert images.search_images(False, None) == ()


def test_no_images_is_one_line(model_cache, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MBP_SEARCH_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ValueError) as info:
        images.search_images(True, None)
    assert "\n" not in str(info.value) and "--images DIR" in str(info.value)
    with pytest.raises(ValueError, match="text-to-image"):
        images.search_images(False, str(tmp_path))
    assert len(images.APPLE_IMAGE_URLS) == 8
