"""The gallery phase of a real search (issue 31): a tiny-sd search through the command line (real
Ray, SQLite, diffusers), then `search images`, resume image by image, and the service's routes.
Every number is recomputed here from the saved PNGs with scikit-image; the float16 images are
compared with a plain diffusers pipeline call written here."""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import sqlite3
import time

import numpy as np
import pytest

from tests.cli_helpers import error_line, run_cli, start_cli
from tests.service_helpers import serving

pytestmark = pytest.mark.slow
PROMPTS = ("a red fox in the snow", "a lighthouse at dusk")
STEPS = 3
SEARCH = ("--model", "tiny-sd", "--nbits", "4", "--num-recipes", "2", "--min-size", "50000", "--workers", "1",
          "--gallery-steps", str(STEPS))


def _rows(db, sid) -> dict:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return {(r, p): dict(psnr=psnr, ssim=ssim, sha256=sha, created=created) for r, p, psnr, ssim, sha, created in
                con.execute("SELECT row_key, prompt, psnr, ssim, sha256, created_at FROM gallery_images "
                            "WHERE search_id = ?", (sid,))}
    finally:
        con.close()


@pytest.fixture(scope="module")
def search(tmp_path_factory, model_cache):
    tmp = tmp_path_factory.mktemp("gallery")
    (tmp / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    db = tmp / "s.db"
    proc = run_cli("submit", *SEARCH, "--prompts", tmp / "prompts.txt", "--db", db, model_cache=model_cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sid = proc.stdout.split()[1]
    out = tmp / "out"
    images = run_cli("images", sid, "-o", out, "--db", db, model_cache=model_cache)
    assert images.returncode == 0, images.stderr[-3000:]
    status = json.loads(run_cli("status", sid, "--db", db, "--json", model_cache=model_cache).stdout)
    return dict(db=db, sid=sid, out=out, tmp=tmp, submit=proc, images=images, status=status,
                rows=_rows(db, sid), recipes=[r["key"] for r in status["recipes"]])


def _pixels(path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_the_search_made_every_image_and_scored_it_with_scikit_image(search):
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    out, rows = search["out"], search["rows"]
    keys = ["original", "linear_8bit", *search["recipes"]]
    assert search["recipes"] and set(rows) == {(k, i) for k in keys for i in range(len(PROMPTS))}
    assert "gallery" in search["submit"].stderr  # the phase ran inside the search
    doc = json.loads((out / "images.json").read_text())
    assert doc["prompts"] == list(PROMPTS) and set(doc["recipes"]) == set(keys)
    for key in keys:
        assert sorted(os.listdir(out / key)) == [f"{i}.png" for i in range(len(PROMPTS))]
        assert [e["prompt"] for e in doc["recipes"][key]] == list(range(len(PROMPTS)))
        for e in doc["recipes"][key]:
            i = e["prompt"]
            ref, img = _pixels(out / "original" / f"{i}.png"), _pixels(out / key / f"{i}.png")
            assert hashlib.sha256((out / key / f"{i}.png").read_bytes()).hexdigest() == rows[(key, i)]["sha256"]
            ssim = structural_similarity(ref, img, channel_axis=-1, data_range=255)
            assert e["ssim"] == rows[(key, i)]["ssim"] == pytest.approx(ssim, abs=1e-12)
            if np.array_equal(ref, img):
                assert e["psnr"] is None and rows[(key, i)]["psnr"] is None
            else:
                assert e["psnr"] == rows[(key, i)]["psnr"] == pytest.approx(peak_signal_noise_ratio(ref, img),
                                                                            abs=1e-9)
    assert any(e["psnr"] is not None for e in doc["recipes"]["linear_8bit"])
    # the per-row summary the status JSON (and the dashboard) show: mean and worst prompt
    for row in search["status"]["gallery"]["rows"]:
        entries = doc["recipes"][row["key"]]
        finite = [e for e in entries if e["psnr"] is not None]
        assert row["ssim_mean"] == pytest.approx(sum(e["ssim"] for e in entries) / len(entries), abs=1e-12)
        if finite:
            assert row["psnr_mean"] == pytest.approx(sum(e["psnr"] for e in finite) / len(finite), abs=1e-9)
            assert row["worst_prompt"] == min(finite, key=lambda e: e["psnr"])["prompt"]
        else:
            assert row["psnr_mean"] is None and row["worst_prompt"] is None
    assert search["status"]["gallery"]["status"] == "done"


def test_the_float16_images_are_a_plain_diffusers_call(search, tiny_sd_spec):
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_spec.location, dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():  # the float16 model, computed in float32 on the CPU as the evaluators do
        for p in pipe.unet.parameters():
            p.data = p.data.to(torch.float16).to(torch.float32)
    seed = torch.Generator().initial_seed()  # Apple's protocol: torch.Generator()'s own seed
    # CPU kernels split a batch over threads: compute with the evaluator's thread count, as it said it ran
    threads = int(re.search(r"\(CPU, (\d+) thread\(s\) each\)", search["submit"].stderr).group(1))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        refs = pipe(prompt=list(PROMPTS), num_inference_steps=STEPS, height=64, width=64,  # one call: --batch-size 0
                    generator=[torch.Generator("cpu").manual_seed(seed) for _ in PROMPTS]).images
    finally:
        torch.set_num_threads(before)
    for i, ref in enumerate(refs):
        assert np.array_equal(np.asarray(ref.convert("RGB")), _pixels(search["out"] / "original" / f"{i}.png"))


def test_the_grid_the_table_and_the_json_download(search, model_cache):
    from PIL import Image

    from search.cli.images_command import CELL_MIN, HEADER_H, LABEL_W

    rows = 2 + len(search["recipes"])
    with Image.open(search["out"] / "grid.png") as grid:
        assert grid.size == (LABEL_W + CELL_MIN * len(PROMPTS), HEADER_H + CELL_MIN * rows)
    status = run_cli("status", search["sid"], "--db", search["db"], model_cache=model_cache)
    assert status.returncode == 0 and "gallery done" in status.stdout and "img dB" in status.stdout, status.stdout
    doc = json.loads(run_cli("download", search["sid"], "-o", "-", "--db", search["db"], model_cache=model_cache).stdout)
    block = doc["mbp_search"]["gallery"]
    means = {r["key"]: r for r in search["status"]["gallery"]["rows"]}
    assert set(block) == set(means)
    for key, v in block.items():
        assert (v["image_psnr_mean"], v["image_ssim_mean"], v["worst_prompt"]) == (
            means[key]["psnr_mean"], means[key]["ssim_mean"], means[key]["worst_prompt"])


def test_one_recipe_and_a_bad_recipe(search, model_cache, tmp_path):
    key = search["recipes"][0]
    proc = run_cli("images", search["sid"], "-o", tmp_path / "one", "--recipe", key, "--db", search["db"],
                   model_cache=model_cache)
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(tmp_path / "one")) == sorted(["original", "linear_8bit", key, "grid.png", "images.json"])
    assert set(json.loads((tmp_path / "one" / "images.json").read_text())["recipes"]) == {"original", "linear_8bit",
                                                                                        key}
    bad = run_cli("images", search["sid"], "-o", tmp_path / "bad", "--recipe", "nope", "--db", search["db"],
                  model_cache=model_cache)
    assert bad.returncode == 2 and "no recipe 'nope'" in error_line(bad) and not (tmp_path / "bad").exists()


def test_resume_image_by_image_after_a_kill(search, model_cache, tmp_path):
    """Forget one recipe's images and delete one float16 file, kill `search images` once it has
    stored an image, run it again: only what was missing is made, once each, and every image is
    the same as before (sha256), with the same scores."""
    from storage import Storage
    from storage.gallery_store import GalleryStore, gallery_root_beside

    db, sid, key = search["db"], search["sid"], search["recipes"][-1]
    before = search["rows"]
    with Storage(db) as storage:
        GalleryStore(storage).forget(sid, [key, "linear_8bit"])
    (gallery_root_beside(db) / sid / "original" / "1.png").unlink()
    # the search's own pool size: on a CPU, kernels round a batch differently with another thread count
    proc = start_cli("images", sid, "-o", tmp_path / "a", "--db", db, "--workers", "1", model_cache=model_cache)
    deadline = time.monotonic() + 300
    while len(_rows(db, sid)) == len(before) - 2 * len(PROMPTS) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = _rows(db, sid)
    assert len(before) - 2 * len(PROMPTS) < len(partial) < len(before) or proc.returncode == 0
    done = run_cli("images", sid, "-o", tmp_path / "b", "--db", db, "--workers", "1", model_cache=model_cache)
    assert done.returncode == 0, done.stderr[-3000:]
    after = _rows(db, sid)
    assert set(after) == set(before)
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    assert con.execute("SELECT status, phase FROM searches WHERE id = ?", (sid,)).fetchone() == ("completed", "done")
    con.close()
    for k, r in after.items():
        assert (r["sha256"], r["psnr"], r["ssim"]) == (before[k]["sha256"], before[k]["psnr"], before[k]["ssim"]), k
        if k in partial:  # stored before the kill: never made again
            assert r["created"] == partial[k]["created"], k
        remade = k[0] in (key, "linear_8bit") or k == ("original", 1)
        assert (r["created"] == before[k]["created"]) == (not remade), k


@pytest.fixture(scope="module")
def server(search, tmp_path_factory):
    """`search serve`'s app over the search's database; its data directory's gallery is the one
    the command line wrote next to the database."""
    from search.service.app import create_app
    from storage.gallery_store import gallery_root_beside

    data = tmp_path_factory.mktemp("service-data")
    (data / "gallery").symlink_to(gallery_root_beside(search["db"]), target_is_directory=True)
    app = create_app(search["db"], data, resume_interrupted=False)
    with serving(app) as url:
        yield url


def test_the_routes(search, server, model_cache, tmp_path):
    import httpx

    sid = search["sid"]
    with httpx.Client(base_url=server, timeout=60) as c:
        view = c.get(f"/searches/{sid}/images").json()
        assert view["status"] == "done" and view["prompts"] == list(PROMPTS)
        assert [r["key"] for r in view["rows"]] == ["original", "linear_8bit", *search["recipes"]]
        for row in view["rows"]:
            assert set(row) >= {"key", "avg_bits", "psnr_mean", "ssim_mean", "worst_prompt", "images"}
            for im in row["images"]:
                assert im["url"] == f"/searches/{sid}/images/{row['key']}/{im['prompt']}.png"
                assert im["sha256"] == search["rows"][(row["key"], im["prompt"])]["sha256"]
        im = view["rows"][2]["images"][1]
        got = c.get(im["url"])
        assert got.status_code == 200 and got.headers["content-type"] == "image/png"
        assert hashlib.sha256(got.content).hexdigest() == im["sha256"] and got.headers["etag"] == f'"{im["sha256"]}"'
        assert got.headers["cache-control"] == "public, max-age=31536000, immutable"
        again = c.get(im["url"], headers={"If-None-Match": got.headers["etag"]})
        assert again.status_code == 304 and not again.content and again.headers["etag"] == got.headers["etag"]
        for bad in (f"/searches/{sid}/images/nope/0.png", f"/searches/{sid}/images/original/9.png",
                    f"/searches/{sid}/images/original/..%2F..%2Fs.db", f"/searches/{sid}/images/original/0.jpg"):
            assert c.get(bad).status_code == 404, bad
        assert c.get("/searches/ffffffffffff/images").status_code == 404
        assert c.get(f"/searches/{sid}").json()["gallery"]["status"] == "done"
    # the remote command downloads the same files (each checked against its sha256)
    proc = run_cli("images", sid, "-o", tmp_path / "r", "--server", server, model_cache=model_cache)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for key in ("original", search["recipes"][0]):
        assert (tmp_path / "r" / key / "0.png").read_bytes() == (search["out"] / key / "0.png").read_bytes()
    assert json.loads((tmp_path / "r" / "images.json").read_text()) == json.loads(
        (search["out"] / "images.json").read_text())
