"""The image-to-image inputs at submission: one line and exit 2 when a refiner has neither Apple's
photographs in the cache (no network in tests) nor --images, or when --images is given to a
text-to-image model; an unsupported pipeline class names what is supported."""
from __future__ import annotations

import json

from tests.cli_helpers import error_line, run_cli


def test_img2img_needs_images(tmp_path, model_cache):
    db = tmp_path / "s.db"
    proc = run_cli("submit", "--model", "tiny-sdxl-refiner", "--db", db, model_cache=model_cache)
    assert proc.returncode == 2
    line = error_line(proc)
    assert "Apple's 8 COCO photographs" in line and "--images DIR" in line
    proc = run_cli("submit", "--model", "tiny-sdxl", "--db", db, "--images", tmp_path, model_cache=model_cache)
    assert proc.returncode == 2 and "image-to-image" in error_line(proc)
    proc = run_cli("submit", "--model", "tiny-sdxl-refiner", "--db", db, "--images", tmp_path, model_cache=model_cache)
    assert proc.returncode == 2 and "no image files" in error_line(proc)
    assert not db.exists()


def test_unsupported_pipeline_class(tmp_path, model_cache):
    folder = tmp_path / "inpaint"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionInpaintPipeline",
                                                         "unet": ["diffusers", "UNet2DConditionModel"]}))
    proc = run_cli("submit", "--model", folder, "--db", tmp_path / "s.db", model_cache=model_cache)
    assert proc.returncode == 2
    line = error_line(proc)
    assert "StableDiffusionInpaintPipeline" in line and "StableDiffusion3Pipeline" in line and "FluxPipeline" in line
