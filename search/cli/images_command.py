"""`search images ID -o DIR [--recipe KEY]`: a search's gallery as files a user can open.

Writes ``DIR/original/<n>.png``, ``DIR/linear_8bit/<n>.png``, ``DIR/<recipe key>/<n>.png`` (n: the
prompt's index, 0-based), ``DIR/grid.png`` (a row per float16 / linear 8-bit / recipe, labelled
with its bits and mean image PSNR/SSIM; a column per prompt) and ``DIR/images.json``
(``{"prompts": [...], "recipes": {key: [{"prompt": i, "psnr": x, "ssim": y}, ...]}}``, the
original and linear_8bit rows too). When images are missing it makes them first: locally on a
Ray pool (`SearchDriver.run_gallery`), with ``--server`` by asking the service
(``POST /searches/{id}/images``) and waiting. Every PNG is checked against its stored sha256.
"""
from __future__ import annotations

import hashlib
import io
import json
import time
from pathlib import Path
from typing import Optional

import typer

from common.files import atomic_write_bytes, atomic_write_text
from search.cli.backend import open_backend
from search.cli.console import CliError, err, guarded
from search.cli.options import DbOption, RayOption, SearchIdArgument, ServerOption, TokenOption

POLL_S = 2.0
CELL_MIN, CELL_MAX, LABEL_W, HEADER_H = 128, 256, 360, 22


def row_label(row: dict) -> str:
    """A grid row's label: its name, bits and mean image PSNR/SSIM against float16."""
    name = {"original": "float16", "linear_8bit": "linear 8-bit"}.get(row["key"], row["key"])
    bits = 16.0 if row["key"] == "original" else 8.0 if row["key"] == "linear_8bit" else row.get("avg_bits")
    psnr = "identical" if row.get("psnr_mean") is None else f"{row['psnr_mean']:.2f} dB"
    ssim = "" if row.get("ssim_mean") is None else f"  SSIM {row['ssim_mean']:.4f}"
    return f"{name}\n{bits:.2f} bits  PSNR {psnr}{ssim}" if bits is not None else f"{name}\nPSNR {psnr}{ssim}"


def draw_grid(rows: list[tuple[str, list[bytes]]], prompts: list[str]) -> bytes:
    """The grid as PNG bytes: one labelled row per (label, images), one column per prompt."""
    from PIL import Image, ImageDraw

    first = Image.open(io.BytesIO(rows[0][1][0]))
    cell = max(CELL_MIN, min(CELL_MAX, first.width))
    grid = Image.new("RGB", (LABEL_W + cell * len(prompts), HEADER_H + cell * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for i, prompt in enumerate(prompts):
        text = f"{i}: {prompt}"
        draw.text((LABEL_W + i * cell + 4, 4), text if len(text) <= cell // 7 else text[: cell // 7 - 1] + "…",
                  fill="black")
    for r, (label, images) in enumerate(rows):
        y = HEADER_H + r * cell
        draw.multiline_text((6, y + 6), label, fill="black", spacing=4)
        for i, data in enumerate(images):
            with Image.open(io.BytesIO(data)) as im:
                resample = Image.NEAREST if im.width < cell else Image.LANCZOS
                grid.paste(im.convert("RGB").resize((cell, cell), resample), (LABEL_W + i * cell, y))
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    return buf.getvalue()


def images_json(view: dict, keys: list[str]) -> dict:
    return {"prompts": view["prompts"],
            "recipes": {row["key"]: [{"prompt": im["prompt"], "psnr": im["psnr"], "ssim": im["ssim"]}
                                     for im in row["images"]] for row in view["rows"] if row["key"] in keys}}


def write_gallery(view: dict, keys: list[str], fetch, out: Path) -> int:
    """Write the files of the rows ``keys`` (``fetch(row, image) -> bytes``, checked here against
    the image's sha256). Returns how many PNGs were written."""
    rows, n = [], 0
    for row in (r for r in view["rows"] if r["key"] in keys):
        folder = out / row["key"]
        folder.mkdir(parents=True, exist_ok=True)
        images = []
        for im in row["images"]:
            data = fetch(row, im)
            if hashlib.sha256(data).hexdigest() != im["sha256"]:
                raise CliError(f"image {row['key']}/{im['prompt']}.png does not match its stored sha256; "
                               "make it again (search images rebuilds missing images)")
            atomic_write_bytes(folder / f"{im['prompt']}.png", data)
            images.append(data)
            n += 1
        rows.append((row_label(row), images))
    atomic_write_bytes(out / "grid.png", draw_grid(rows, view["prompts"]))
    atomic_write_text(out / "images.json", json.dumps(images_json(view, keys), indent=2, allow_nan=False) + "\n")
    return n


def _keys(view: dict, recipe: Optional[str], sid: str) -> list[str]:
    keys = [row["key"] for row in view["rows"]]
    if recipe is None:
        return keys
    if recipe in ("original", "linear_8bit") or recipe not in keys:
        choices = ", ".join(k for k in keys if k not in ("original", "linear_8bit")) or "(none)"
        raise CliError(f"no recipe '{recipe}' in search {sid}; choose from: {choices}")
    return ["original", "linear_8bit", recipe]


def _local(backend, search_id: str, workers, ray_address, out: Path, recipe: Optional[str]) -> tuple[dict, list, int]:
    from common.clock import utcnow
    from search.read_models import gallery
    from storage.gallery_store import GalleryFiles, gallery_root_beside

    storage = backend.storage
    s = storage.get_search(search_id)
    view = gallery(storage, s)
    keys = _keys(view, recipe, s.id)
    files = GalleryFiles(gallery_root_beside(storage.path))
    missing = any(not files.path(rec.path).is_file() for rec in _records(storage, s.id))
    if view["status"] != "done" or missing:
        if s.status in ("pending", "running", "cancelling") and not s.driver_gone(utcnow()):
            raise CliError(f"search {s.id} is still running; its gallery phase follows the recipes (search status "
                           f"{s.id} shows it)")
        _make_locally(storage, s, workers, ray_address)
        view = gallery(storage, storage.get_search(s.id))
    paths = {(r.row, r.prompt): r.path for r in _records(storage, s.id)}
    fetch = lambda row, im: files.read(paths[(row["key"], im["prompt"])]) or b""  # noqa: E731
    return view, keys, write_gallery(view, keys, fetch, out)


def _records(storage, sid: str):
    from storage.gallery_store import GalleryStore

    return GalleryStore(storage).images(sid)


def _make_locally(storage, s, workers, ray_address) -> int:
    from search.driver.cluster import ensure_ray, shutdown_ray
    from search.driver.driver import SearchDriver
    from search.driver.progress import console_reporter
    from workers.models import model_options, resolve_model

    from search.driver.signals import SearchFailed, SearchInterrupted
    from search.driver.pool import ItemFailed, PoolError

    spec = resolve_model(s.model, **model_options(s.config))
    try:
        ensure_ray(ray_address)
        with console_reporter(err) as reporter:
            return SearchDriver(storage, s, spec, workers=workers, reporter=reporter).run_gallery()
    except (SearchInterrupted, KeyboardInterrupt):
        raise CliError(f"interrupted: every image made is stored; `search images {s.id} -o DIR` again makes the "
                       "rest", 130) from None
    except (SearchFailed, ItemFailed, PoolError) as exc:
        raise CliError(f"the gallery of search {s.id} failed: {exc}", 1) from None
    finally:
        shutdown_ray()


def _remote(backend, search_id: str, out: Path, recipe: Optional[str]) -> tuple[dict, list, int]:
    client = backend.client
    view = client.request("GET", f"/searches/{search_id}/images").json()
    sid = client.request("GET", f"/searches/{search_id}").json()["id"]
    keys = _keys(view, recipe, sid)
    if view["status"] == "missing":
        client.request("POST", f"/searches/{sid}/images")
        err.print(f"the service is making the gallery of search {sid}", highlight=False)
    while view["status"] != "done":
        time.sleep(POLL_S)
        view = client.request("GET", f"/searches/{sid}/images").json()
        if view["status"] == "missing":
            raise CliError(f"the gallery of search {sid} stopped before it was complete; run the command again")
    fetch = lambda row, im: client.request("GET", im["url"]).content  # noqa: E731
    return view, keys, write_gallery(view, keys, fetch, out)


@guarded
def images_cmd(ctx: typer.Context, search_id: str = SearchIdArgument,
               output: Path = typer.Option(..., "-o", "--output", help="directory for the images, grid.png and "
                                           "images.json (created if missing)"),
               recipe: Optional[str] = typer.Option(None, "--recipe", help="only this recipe's images (and "
                                                    "original and linear_8bit)"),
               workers: Optional[int] = typer.Option(None, "--workers", "-w", help="evaluators for missing images "
                                                     "(local) [default: GPUs, else 2]"),
               ray_address: Optional[str] = RayOption, db: Optional[Path] = DbOption,
               server: Optional[str] = ServerOption, token: Optional[str] = TokenOption) -> None:
    """Write a search's gallery: the float16, linear 8-bit and every recipe's image of each prompt,
    a grid and their image PSNR/SSIM (made first when missing)."""
    if output.exists() and not output.is_dir():
        raise CliError(f"{output} is a file; give a directory")
    if not output.parent.exists():
        raise CliError(f"directory {output.parent} does not exist")
    if workers is not None and workers < 1:
        raise CliError(f"--workers must be at least 1, got {workers}")
    with open_backend(ctx, db, server, token, local=("db", "workers", "ray_address")) as backend:
        if backend.runs_here:
            view, keys, n = _local(backend, search_id, workers, ray_address, output, recipe)
        else:
            view, keys, n = _remote(backend, search_id, output, recipe)
    err.print(f"wrote {n} images, {output / 'grid.png'} and {output / 'images.json'}", highlight=False,
              soft_wrap=True)


__all__ = ["images_cmd", "draw_grid", "row_label", "images_json", "write_gallery"]
