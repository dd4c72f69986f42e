"""What a request to the service may carry: the JSON bodies (built from the option table that the
command line's flags come from too), search ids, model names, and the `ApiError` that refuses
a request with a status code and one line."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, create_model

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
        """Parsed exactly as the CLI parses its flags (same functions, same messages)."""
        return parse_search_options(self.model_dump(include={o.name for o in SEARCH_OPTIONS}))


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
    if not path.is_absolute():
        raise ApiError(422, f"model path '{name}' must be an absolute path on the server")
    resolved = path.resolve()
    if not allowed_dirs:
        raise ApiError(403, f"model path '{name}' refused: this server accepts no local model paths "
                            "(start it with --allow-model-dir DIR)")
    if not any(resolved == d or resolved.is_relative_to(d) for d in allowed_dirs):
        allowed = ", ".join(map(str, allowed_dirs))
        raise ApiError(403, f"model path '{name}' is outside the server's allowed model directories ({allowed})")
    return str(resolved)
