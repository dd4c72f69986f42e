"""Refresh the dashboard picture in the docs (docs/img/dashboard-search.png): a real `search serve`
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
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]
MAX_BYTES = 300_000  # the docs keep pictures small


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--output", type=Path, default=ROOT / "docs" / "img" / "dashboard-search.png")
    ap.add_argument("--chromium", type=Path, default=Path(os.environ.get("MBP_TEST_CHROMIUM", "/usr/bin/chromium")))
    args = ap.parse_args(argv)
    if not args.chromium.exists():
        ap.error(f"no Chromium at {args.chromium} (scripts/setup.sh installs Debian's chromium as root)")
    from playwright.sync_api import sync_playwright

    work = Path(tempfile.mkdtemp(prefix="mbpshot", dir="/tmp"))  # short: Ray's socket paths have a length limit
    (work / "cache").mkdir()
    srv = ServiceProcess(work / "searches.db", ray_env(work / "cache", secrets.token_hex(16), tmpdir=str(work)),
                         secrets.token_urlsafe(24), work / "serve.log")
    try:
        srv.start()
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
            browser.close()
    finally:
        srv.stop()
        shutil.rmtree(work, ignore_errors=True)
    size = args.output.stat().st_size
    print(f"wrote {args.output} ({size / 1e3:.0f} kB) from search {sid}")
    if size >= MAX_BYTES:
        print(f"the picture is {size} bytes, over the docs' {MAX_BYTES}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
