"""What a request to the service may carry: the JSON bodies (built from the option table that the
command line's flags come from too), search ids, model names, and the `ApiError` that refuses
a request with a status code and one line."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, create_model

from search.service.uploaded_images import LIMITS_TEXT, MAX_IMAGES
from search.submit_options import APPLY_HELP, COREML_NODE_HELP, RESUME_HELP, SEARCH_OPTIONS, WORKERS_HELP, parse_search_options

ID_PATTERN = re.compile(r"[0-9a-f]{1,32}")


class ApiError(Exception):
    """An expected failure of a request: status code, one-line detail, optional extras."""

    def __init__(self, status: int, detail: str, **extra):
        super().__init__(detail)
        self.status, self.detail, self.extra = status, detail, extra


def checked_id(sid: str) -> str:
    """A search id as stored (hex); anything else is 404, so no user string reaches a path."""
    if not isinstance(sid, str) or not ID_PATTERN.fullmatch(sid):
        raise ApiError(404, f"no search '{str(sid)[:40]}'")
    return sid


def find_search(storage, sid: str):
    """The stored search a request names (an id or an unambiguous prefix): 404 when there is none,
    409 when a prefix is ambiguous."""
    from common.errors import first_line
    from storage import StorageError

    checked_id(sid)
    try:
        return storage.get_search(sid)
    except StorageError as exc:
        msg = first_line(exc)
        if "ambiguous" in msg:
            raise ApiError(409, msg) from None
        raise ApiError(404, f"no search '{sid}'") from None


class _Submit(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # JSON as typed: no 0 for false, no "1" for 1

    def options(self) -> dict:
        """Parsed exactly as the CLI parses its flags (same functions, same messages); ``images_dir`` is left
        out (None): a path on the server is checked by `submitted_images`, never resolved here first."""
        return parse_search_options(self.model_dump(include={o.name for o in SEARCH_OPTIONS} - {"images_dir"}))


SubmitRequest = create_model(
    "SubmitRequest",
    __base__=_Submit,
    __doc__="The options of `search submit`, as JSON. Lists may be given as the CLI's comma strings.",
    model=(str, Field(..., min_length=1, max_length=1024, examples=["stabilityai/stable-diffusion-xl-base-1.0"],
                      description="Hub id, alias, built-in tiny-sdxl / tiny-sd, or an absolute path under an "
                                  "allowed model directory of the server")),
    workers=(Optional[int], Field(None, ge=1, le=4096, description=WORKERS_HELP)),
    **{o.name: (o.json_type or o.cli_type, Field(o.default, **{"description": o.help, **o.json_field}))
       for o in SEARCH_OPTIONS},
    resume=(bool, Field(False, description=RESUME_HELP)),
    apply=(Optional[str], Field(None, min_length=1, max_length=8192, description=APPLY_HELP)),
    coreml_node=(Optional[str], Field(None, description=COREML_NODE_HELP)),
    images=(Optional[list[str]], Field(None, min_length=1, max_length=MAX_IMAGES, description=(
        "image-to-image pipelines: the images themselves, one per prompt in order, each the standard base64 "
        f"(no line breaks) of a PNG or JPEG file ({LIMITS_TEXT}); instead of images_dir"))),
)


class ResumeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # JSON as typed: no 0 for false, no "1" for 1
    workers: Optional[int] = Field(None, ge=1, le=4096)


def check_model(model: str, allowed_dirs: tuple[Path, ...]) -> str:
    """Built-in names, aliases and Hub ids pass; a path must be absolute and resolve under one of
    ``allowed_dirs``. Returns the name to use (a path fully resolved)."""
    from workers.models import ALIASES, BUILTIN_MODELS, _looks_like_path, path_kind

    name = model.strip()
    if "\x00" in name:
        raise ApiError(422, "model name contains a NUL character")
    if name in BUILTIN_MODELS or name in ALIASES:
        return name
    path = Path(name)
    if not (_looks_like_path(name) or path.is_absolute() or name.startswith("~") or path_kind(path)):
        return name  # a Hub id; resolve_model checks it
    return _model_path(name, "model path", allowed_dirs)


def _model_path(name: str, what: str, allowed_dirs: tuple[Path, ...]) -> str:
    """A path on the server that a remote request names as model files: absolute, and resolved under
    one of ``allowed_dirs`` (--allow-model-dir); the answer depends on the string and those
    directories only, never on what exists there."""
    path = Path(name)
    if "\x00" in name:
        raise ApiError(422, f"{what} contains a NUL character")
    if not path.is_absolute():
        raise ApiError(422, f"{what} '{name}' must be an absolute path on the server")
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError):  # a symlink loop: refused like any path outside
        resolved = None
    if not allowed_dirs:
        raise ApiError(403, f"{what} '{name}' refused: this server accepts no local model paths "
                            "(start it with --allow-model-dir DIR)")
    if resolved is None or not any(resolved == d or resolved.is_relative_to(d) for d in allowed_dirs):
        allowed = ", ".join(map(str, allowed_dirs))
        raise ApiError(403, f"{what} '{name}' is outside the server's allowed model directories ({allowed})")
    return str(resolved)


def check_model_files(loras, config_dir, allowed_dirs: tuple[Path, ...]) -> None:
    """A remote request's LoRA files (``FILE[:SCALE]``) and ``config_dir`` are model files on the
    server: the rule for model paths applies, checked before anything reads them (so the answer
    never says whether a file exists)."""
    for text in loras or ():
        path = str(text).strip()
        head, sep, tail = path.rpartition(":")
        if sep and head:
            try:
                float(tail)
                path = head
            except ValueError:
                pass
        _model_path(path, "lora", allowed_dirs)
    if config_dir is not None:
        _model_path(str(config_dir).strip(), "config_dir", allowed_dirs)


def check_images_dir(folder: str, allowed_dirs: tuple[Path, ...]) -> str:
    """A remote request's ``images_dir``, by the rule for model paths: absolute, and resolved (symlinks
    followed) under one of ``allowed_dirs`` (``--allow-images-dir``). Returns the resolved path. The
    answer depends on the string and the allowed directories only, never on what exists there, so a
    refusal tells a client nothing about the server's files."""
    name = folder.strip()
    if "\x00" in name:
        raise ApiError(422, "images_dir contains a NUL character")
    path = Path(name)
    if not path.is_absolute():
        raise ApiError(422, f"images_dir '{name}' must be an absolute path on the server (or send the images "
                            "themselves as images)")
    if not allowed_dirs:
        raise ApiError(403, f"images_dir '{name}' refused: this server accepts no image folders (start it with "
                            "--allow-images-dir DIR, or send the images themselves as images)")
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError, ValueError):  # a symlink loop, an unencodable name: refused like any outside
        resolved = None
    if resolved is None or not any(resolved == d or resolved.is_relative_to(d) for d in allowed_dirs):
        allowed = ", ".join(map(str, allowed_dirs))
        raise ApiError(403, f"images_dir '{name}' is outside the server's allowed image directories ({allowed}); "
                            "send the images themselves as images")
    return str(resolved)


def submitted_images(body, allowed_dirs: tuple[Path, ...], data_dir: Path) -> str | None:
    """The folder a remote search reads its images from: ``images_dir`` checked by `check_images_dir`,
    or the uploaded ``images`` checked and stored under ``data_dir`` (search.service.uploaded_images);
    None when neither is given. 422 / 403 with one line otherwise; nothing is stored on a refusal."""
    from search.service.uploaded_images import ImageRefused, decode_images, store_images

    if body.images_dir is not None and body.images is not None:
        raise ApiError(422, "give images or images_dir, not both")
    if body.images_dir is not None:
        return check_images_dir(body.images_dir, allowed_dirs)
    if body.images is None:
        return None
    try:
        return str(store_images(decode_images(body.images), data_dir))
    except ImageRefused as exc:
        raise ApiError(422, str(exc)) from None


def body_refusal(headers):
    """A `POST /searches` body too large to read (uploaded images are bounded, see
    search.service.uploaded_images): 413, or 411 without a Content-Length; None when it may be read."""
    from fastapi.responses import JSONResponse

    from search.service.uploaded_images import LIMITS_TEXT, MAX_BODY_BYTES

    length = headers.get("content-length")
    if length is None:
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return JSONResponse(status_code=411, content={"detail": "send the request with a Content-Length"})
        return None
    if not length.strip().isdigit() or int(length) > MAX_BODY_BYTES:
        return JSONResponse(status_code=413, content={
            "detail": f"request body larger than {MAX_BODY_BYTES // 2**20} MiB (images: {LIMITS_TEXT})"})
    return None
