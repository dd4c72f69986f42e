"""Refresh the dashboard pictures in the docs (docs/img/dashboard-search.png, and
docs/img/dashboard-gallery.png when the search has images): a real `search serve`
(local Ray, a temporary database and model cache), the search the dashboard's browser tests run
(tiny SDXL, 4 and 8 bits), and its page in headless Chromium once the search has completed.

Tests never write into the checkout; run this by hand when the search page changes:

    .venv/bin/python scripts/dashboard_screenshot.py            # -o another.png to write elsewhere
"""
from __future__ import annotations

import argparse
import os
import secrets
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.search.test_service import ACTIVE, ServiceProcess, ray_env, wait_for  # noqa: E402  the tests' server wrapper

SEARCH = dict(model="tiny-sdxl", nbits="4,8", min_size=16384, num_recipes=3)  # as tests/search/test_dashboard.py
from search.submit_options import SEARCH_OPTIONS  # noqa: E402

if any(o.name == "gallery_steps" for o in SEARCH_OPTIONS):  # the gallery phase: 2 steps per image, as the tests
    SEARCH["gallery_steps"] = 2
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]
MAX_BYTES = 300_000  # the docs keep pictures small


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--output", type=Path, default=ROOT / "docs" / "img" / "dashboard-search.png")
    ap.add_argument("--chromium", type=Path, default=Path(os.environ.get("MBP_TEST_CHROMIUM", "/usr/bin/chromium")))
    ap.add_argument("--db", type=Path, help="serve this database (a copy of it) instead of running a new search")
    ap.add_argument("--search", help="with --db: the finished search to show")
    args = ap.parse_args(argv)
    if bool(args.db) != bool(args.search):
        ap.error("--db and --search go together")
    if not args.chromium.exists():
        ap.error(f"no Chromium at {args.chromium} (scripts/setup.sh installs Debian's chromium as root)")
    from playwright.sync_api import sync_playwright

    shots = [args.output]
    work = Path(tempfile.mkdtemp(prefix="mbpshot", dir="/tmp"))  # short: Ray's socket paths have a length limit
    (work / "cache").mkdir()
    if args.db:  # a copy of the file and its data dir (images, progress): the original is left as it was
        import sqlite3

        src, dst = sqlite3.connect(f"file:{args.db}?mode=ro", uri=True), sqlite3.connect(work / "searches.db")
        src.backup(dst)
        src.close()
        dst.close()
        for beside in (".service", ".palettes", ".gallery"):
            if args.db.with_name(args.db.name + beside).is_dir():
                shutil.copytree(args.db.with_name(args.db.name + beside), work / ("searches.db" + beside))
    srv = ServiceProcess(work / "searches.db", ray_env(work / "cache", secrets.token_hex(16), tmpdir=str(work)),
                         secrets.token_urlsafe(24), work / "serve.log", "--no-resume-interrupted")
    try:
        srv.start()
        if args.search:
            sid = args.search
        else:
            r = srv.client().post("/searches", json=SEARCH)
            assert r.status_code == 201, r.text
            sid = r.json()["id"]
        d = wait_for(lambda: srv.client().get(f"/searches/{sid}").json(), lambda d: d["status"] not in ACTIVE, 900,
                     "the search to finish", interval=2)
        assert d["status"] == "completed", d
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(args.chromium), args=FLAGS, headless=True)
            page = browser.new_context(viewport={"width": 1300, "height": 1000}).new_page()
            page.goto(srv.url + "/")
            page.wait_for_selector("#token-form:not([hidden])")
            page.fill("#token-input", srv.token)
            page.click("#token-form button")
            page.goto(srv.url + f"/#/search/{sid}")
            page.wait_for_selector("#view[data-status=completed]")
            page.wait_for_function("(document.querySelector('#view').dataset.chartsVersion || '')"
                                   ".includes('completed')")
            page.mouse.move(0, 0)
            args.output.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.output), full_page=True)
            gallery = args.output.with_name("dashboard-gallery.png")
            if page.locator("#gallery img.thumb").count():  # the gallery, one recipe opened beside float16
                page.wait_for_function("[...document.querySelectorAll('#gallery img.thumb')]"
                                       ".every((i) => i.complete && i.naturalWidth > 0)")
                page.locator("#gallery tr[data-key]:not([data-key=original]):not([data-key=linear_8bit]) "
                             "img.thumb[data-prompt='0']").last.click()  # the smallest recipe: differences show
                page.wait_for_selector("#cmp-metrics")
                page.mouse.move(0, 0)
                page.wait_for_timeout(500)
                page.locator("#gallery").screenshot(path=str(gallery))
                shots.append(gallery)
            browser.close()
    finally:
        srv.stop()
        shutil.rmtree(work, ignore_errors=True)
    code = 0
    for shot in shots:
        if shot.stat().st_size >= MAX_BYTES:  # 256 colours: the page's flat colours stay exact, images dither
            from PIL import Image

            with Image.open(shot) as im:
                im.convert("RGB").quantize(256).save(shot, optimize=True)
        size = shot.stat().st_size
        print(f"wrote {shot} ({size / 1e3:.0f} kB) from search {sid}")
        if size >= MAX_BYTES:
            print(f"{shot} is {size} bytes, over the docs' {MAX_BYTES}", file=sys.stderr)
            code = 1
    return code


if __name__ == "__main__":
    sys.exit(main())
