"""Issue 31 item 7: over HTTP a client may not choose the server's images. `images_dir` follows the
model-path rule (only under `--allow-images-dir`, and a refusal says nothing about what exists);
a client sends its own images (`images`, base64, limited, checked with PIL), stored content-addressed
under the service's data directory; `search submit --images DIR --server URL` sends them.

The service is the real app (`create_app`) served by uvicorn on 127.0.0.1 and spoken to over real
HTTP, with the real SQLite storage. Only the driver launch is replaced by a recorder: these tests
check what a submission stores (the config the driver will prepare from), not a search, so no Ray
is started. The stored folder is read back with the driver's own reader (`folder_images`) and
compared with sha256 of the bytes sent, computed here.
"""
from __future__ import annotations

import base64
import hashlib
import io
import os
import socket
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.cli_helpers import error_line, run_cli

MODEL = "tiny-sdxl-refiner"  # image-to-image; nothing is built: the submission only names it


def png(seed: int, size=(24, 16), fmt="PNG") -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class Served:
    """The app on a real socket (uvicorn in a thread, lifespan off: no Ray), launches recorded."""

    def __init__(self, base: Path, allowed: tuple[Path, ...]):
        import uvicorn

        from search.service.app import create_app
        from storage import Storage

        self.db, self.data = base / "searches.db", base / "data"
        self.app = create_app(self.db, self.data, allowed_images_dirs=allowed, resume_interrupted=False)
        service = self.app.state.service
        service.storage = Storage(self.db)
        self.launched: list[str] = []
        service.launch = lambda prepared, workers: self.launched.append(prepared.search.id)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the service did not start"
            time.sleep(0.05)
        self.http = httpx.Client(base_url=self.url, timeout=60)

    def post(self, **body) -> httpx.Response:
        return self.http.post("/searches", json={"model": MODEL, **body})

    def config(self, sid: str) -> dict:
        return self.app.state.service.storage.get_search(sid).config

    def rows(self) -> int:
        con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)
        try:
            return con.execute("SELECT COUNT(*) FROM searches").fetchone()[0]
        finally:
            con.close()

    def stop(self) -> None:
        self.http.close()
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def served(tmp_path_factory, model_cache):
    base = tmp_path_factory.mktemp("remote-images")
    allowed = base / "allowed"
    (allowed / "photos").mkdir(parents=True)
    for i in range(2):
        (allowed / "photos" / f"{i}.png").write_bytes(png(i))
    os.symlink("/etc", allowed / "escape")  # inside by name, outside once resolved
    srv = Served(base, (allowed,))
    srv.allowed = allowed
    try:
        yield srv
    finally:
        srv.stop()


def uploads(srv) -> list[Path]:
    root = srv.data / "uploaded-images"
    return sorted(p for p in root.iterdir() if not p.name.startswith(".")) if root.is_dir() else []


def test_images_dir_outside_refused_alike(served, tmp_path):
    before = served.rows()
    real = tmp_path / "real"
    real.mkdir()
    (real / "a.png").write_bytes(png(7))
    os.symlink(tmp_path / "loop2", tmp_path / "loop1")
    os.symlink(tmp_path / "loop1", tmp_path / "loop2")
    answers = {}
    for path in (str(real), str(tmp_path / "loop1" / "x"), "/usr/share/pixmaps", "/root", str(tmp_path / "no" / "such"),
                 "/etc",
                 str(served.allowed / "escape"), str(served.allowed / "escape" / "ssl"), str(served.allowed) + "/../x"):
        r = served.post(images_dir=path)
        answers[path] = (r.status_code, r.json()["detail"])
    for path, (status, detail) in answers.items():
        assert status == 403, (path, status, detail)
        assert "\n" not in detail and detail.startswith(f"images_dir '{path}' is outside the server's allowed image "
                                                        f"directories ({served.allowed.resolve()})"), detail
        # Existing, holding images, missing, unreadable: the same words, the path given aside.
        assert detail.replace(path, "P") == answers["/root"][1].replace("/root", "P")
    r = served.post(images_dir="photos")
    assert r.status_code == 422 and r.json()["detail"].startswith("images_dir 'photos' must be an absolute path")
    assert served.rows() == before and not served.launched[before:]


def test_model_files_refused_like_model_paths(served, tmp_path):
    """LoRA files and --config folders (single-file checkpoints, issue 32) are model files on the
    server: a request naming them follows the model-path rule, checked before anything reads them,
    so an existing and a missing path get the same words. (This server allows no model directory.)"""
    from search.service.requests import ApiError, check_model_files

    before = served.rows()
    real = tmp_path / "lora.safetensors"
    real.write_bytes(b"not read")
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    (cfg / "model_index.json").write_text("{}")
    for field, sent, path in (("loras", [f"{real}:0.5"], str(real)),
                              ("loras", ["/no/such.safetensors"], "/no/such.safetensors"),
                              ("config_dir", str(cfg), str(cfg)), ("config_dir", "/no/such", "/no/such")):
        r = served.post(**{field: sent})
        what = "lora" if field == "loras" else "config_dir"
        assert r.status_code == 403 and r.json()["detail"] == (
            f"{what} '{path}' refused: this server accepts no local model paths (start it with --allow-model-dir DIR)"
        ), (field, r.status_code, r.text)
    assert served.rows() == before and not served.launched[before:]
    allowed = (tmp_path.resolve(),)
    check_model_files([f"{real}:2"], str(cfg), allowed)  # under an allowed model directory: accepted
    for loras, config in ((["/etc/passwd:1"], None), ([], "/etc"), ([str(tmp_path / ".." / "x.safetensors")], None)):
        with pytest.raises(ApiError) as info:
            check_model_files(loras, config, allowed)
        assert info.value.status == 403 and "outside the server's allowed model directories" in info.value.detail

def test_no_allowed_dir_refuses_every_path():
    from search.service.requests import ApiError, check_images_dir

    for path in ("/etc", "/nothing/here"):
        with pytest.raises(ApiError) as info:
            check_images_dir(path, ())
        assert info.value.status == 403 and info.value.detail == (
            f"images_dir '{path}' refused: this server accepts no image folders (start it with --allow-images-dir "
            "DIR, or send the images themselves as images)")


def test_images_dir_under_allowed_accepted(served):
    folder = served.allowed / "photos"
    r = served.post(images_dir=str(folder), seed=1)
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    assert served.config(sid)["images_dir"] == str(folder.resolve()) and sid in served.launched


def test_uploaded_images_stored_and_used(served, model_cache):
    from workers.evaluation.images import folder_images

    sent = [png(11), png(12, fmt="JPEG"), png(13, size=(40, 30))]
    r = served.post(images=[b64(d) for d in sent], seed=2)
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    folder = Path(served.config(sid)["images_dir"])
    digests = [hashlib.sha256(d).hexdigest() for d in sent]
    assert folder == (served.data / "uploaded-images" / hashlib.sha256("\n".join(digests).encode()).hexdigest()
                      ).resolve()
    names = sorted(p.name for p in folder.iterdir())
    assert names == [f"00-{digests[0]}.png", f"01-{digests[1]}.jpg", f"02-{digests[2]}.png"]
    assert [(folder / n).read_bytes() for n in names] == sent
    assert list(folder_images(str(folder))) == digests  # what the driver's prepare phase reads, in order
    # The same images again: the same folder, so the same request (a duplicate of the unfinished search).
    again = served.post(images=[b64(d) for d in sent], seed=2)
    assert again.status_code == 409 and again.json()["existing"] == sid
    assert len([p for p in uploads(served) if p.name == folder.name]) == 1


def test_bad_uploads_refused(served):
    from search.service.uploaded_images import MAX_IMAGE_BYTES, MAX_IMAGES, MAX_TOTAL_BYTES

    before_rows, before_files = served.rows(), uploads(served)
    rng = np.random.default_rng(0)
    side = 1150  # a noise PNG just under 4 MiB: nine of them pass each limit and fail the total
    big = png(5, size=(side, side))
    assert MAX_IMAGE_BYTES - 300_000 < len(big) <= MAX_IMAGE_BYTES and 9 * len(big) > MAX_TOTAL_BYTES
    bomb = io.BytesIO()
    Image.new("RGB", (5000, 4000)).save(bomb, format="PNG")
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    cases = {
        "bad base64": (["not base64!"], "images[0] is not valid base64"),
        "not an image": ([b64(b"hello, I am text")], "images[0] is not a readable PNG or JPEG image"),
        "truncated": ([b64(png(1)), b64(png(2)[:-40])], "images[1] is not a readable PNG or JPEG image"),
        "gif": ([b64(gif.getvalue())], "images[0] is GIF; send PNG or JPEG"),
        "too big": ([b64(rng.bytes(MAX_IMAGE_BYTES + 1))], "images[0] is larger than 4 MiB"),
        "too many pixels": ([b64(bomb.getvalue())], "images[0] is 5000x4000 pixels, more than 16 megapixels"),
        "too much in all": ([b64(big)] * 9, "images: more than 32 MiB in all"),
        "too many": ([b64(png(1))] * (MAX_IMAGES + 1), "images: List should have at most 16 items"),
        "none": ([], "images: List should have at least 1 item"),
    }
    for case, (images, expected) in cases.items():
        r = served.post(images=images)
        assert r.status_code == 422, (case, r.status_code, r.text[:300])
        detail = r.json()["detail"]
        assert detail.startswith(expected) and "\n" not in detail, (case, detail)
    r = served.post(images=[b64(png(1))], images_dir=str(served.allowed / "photos"))
    assert r.status_code == 422 and r.json()["detail"] == "give images or images_dir, not both"
    r = served.post(images=[b64(png(1))], protocol="nope")  # good images, another option refused: none kept
    assert r.status_code == 422 and "protocol" in r.json()["detail"]
    r = served.http.post("/searches", content=b"{" + b" " * (48 * 2**20 + 1) + b"}",
                         headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["detail"].startswith("request body larger than 48 MiB")
    assert served.rows() == before_rows and uploads(served) == before_files  # nothing stored


def test_cli_submit_sends_the_folder(served, tmp_path, model_cache):
    folder = tmp_path / "mine"
    folder.mkdir()
    sent = {"b.png": png(21), "a.jpg": png(22, fmt="JPEG"), "notes.txt": b"not an image, not sent"}
    for name, data in sent.items():
        (folder / name).write_bytes(data)
    proc = run_cli("submit", "--model", MODEL, "--images", str(folder), "--seed", "3", "--server", served.url,
                   model_cache=model_cache, MBP_SEARCH_TOKEN="")
    assert proc.returncode == 0, proc.stderr
    sid = proc.stdout.split()[1]
    stored = Path(served.config(sid)["images_dir"])
    assert stored.parent == (served.data / "uploaded-images").resolve()  # not the client's path
    assert [p.read_bytes() for p in sorted(stored.iterdir())] == [sent["a.jpg"], sent["b.png"]]  # name order
    (folder / "c.png").write_bytes(b"\x89PNG broken")
    proc = run_cli("submit", "--model", MODEL, "--images", str(folder), "--seed", "4", "--server", served.url,
                   model_cache=model_cache, MBP_SEARCH_TOKEN="")
    assert proc.returncode == 2 and f"'{folder / 'c.png'}' is not a readable PNG or JPEG image" in error_line(proc)


def test_serve_passes_allow_images_dir(tmp_path, monkeypatch):
    """`search serve --allow-images-dir DIR` reaches the app (Ray's start is made to fail: no cluster here);
    a missing directory is refused in one line before anything starts."""
    from types import SimpleNamespace

    from typer.testing import CliRunner

    import search.service.app as service_app
    from search.cli.app import app

    given = {}

    def fake_app(*args, **kwargs):
        given.update(kwargs)

        def start():
            raise RuntimeError("no Ray in this test")
        return SimpleNamespace(state=SimpleNamespace(service=SimpleNamespace(start=start)))

    monkeypatch.setattr(service_app, "create_app", fake_app)
    (tmp_path / "imgs").mkdir()
    args = ["serve", "--port", "0", "--db", str(tmp_path / "s.db"), "--allow-images-dir", str(tmp_path / "imgs")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "no Ray in this test" in result.output
    assert [Path(d) for d in given["allowed_images_dirs"]] == [tmp_path / "imgs"]
    result = CliRunner().invoke(app, [*args[:-1], str(tmp_path / "none")])
    flat = " ".join(result.output.split())  # the console may wrap a long path
    assert result.exit_code == 2 and f"error: --allow-images-dir {tmp_path / 'none'} is not a directory" in flat
    assert not (tmp_path / "s.db").exists()
