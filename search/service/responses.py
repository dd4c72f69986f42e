"""What the service answers besides success, declared once: the bodies of its errors, the
handlers that produce them, and `errors(...)` for a route's ``responses=``, so the published
OpenAPI documents every status a route returns with the body a client really gets.

Every error is ``{"detail": "<one line>"}`` (`ErrorBody`); a 422 from a malformed request adds
the field errors (`ValidationBody`), a 409 on submit the id of the search that already exists
(`DuplicateBody`). A router in another module declares its errors the same way:

    @router.get("/things/{thing_id}", responses=errors(404, 422))

The app adds 401 to every route when it has a token (`auth_responses`) and marks the routes
that need none (`public`).
"""
from __future__ import annotations

from typing import Optional

from fastapi import FastAPI
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException
from starlette.routing import Match

from common.errors import first_line


class ErrorBody(BaseModel):
    """Every error the service answers."""

    detail: str = Field(description="what went wrong, one line")


class FieldError(BaseModel):
    loc: list[str] = Field(description="where in the request: 'body', 'path', then field names")
    msg: str
    type: Optional[str] = None


class ValidationBody(ErrorBody):
    """422: a request whose JSON or parameters do not match the schema (``errors`` lists every
    field), or whose values are refused by the search's own checks (an unknown model name,
    options that contradict each other: ``detail`` only)."""

    errors: list[FieldError] = Field(default_factory=list)


class DuplicateBody(ErrorBody):
    """409 on submit: an unfinished search with the same model and options exists."""

    existing: Optional[str] = Field(None, description="its id: resume it, or submit with resume=true")


class SearchSummary(BaseModel):
    """A search as listed (more fields than these are returned)."""

    model_config = ConfigDict(extra="allow")
    id: str
    model: str
    status: str
    phase: str
    evaluations: int


_ERRORS = {
    401: ("missing or wrong bearer token", ErrorBody),
    403: ("refused: a model path outside the server's allowed model directories", ErrorBody),
    404: ("no such search (ids are hex)", ErrorBody),
    409: ("conflict with the search's state (already running, completed, not running), or an "
          "ambiguous id prefix", ErrorBody),
    422: ("invalid request, or values the search refuses", ValidationBody),
}


def errors(*codes: int, bodies: dict[int, type[BaseModel]] | None = None) -> dict:
    """``responses=`` for a route that answers these error statuses; ``bodies`` ({409: a model})
    overrides a status's body."""
    out = {}
    for code in codes:
        description, model = _ERRORS[code]
        out[code] = {"description": description, "model": (bodies or {}).get(code, model)}
    return out


def links(operations: dict[str, str], parameter: str, value: str) -> dict:
    """OpenAPI links (name -> operationId) filling ``parameter`` from this response: how a client
    (and schemathesis' stateful phase) goes from a created thing to its other routes."""
    return {name: {"operationId": op, "parameters": {parameter: value}} for name, op in operations.items()}


def auth_responses(token: str | None) -> dict:
    """App-wide ``responses=``: 401 on every route when the server has a token."""
    return errors(401) if token else {}


def public(app: FastAPI, *paths: str) -> None:
    """Publish ``paths`` as needing no token (no security requirement, no 401), as the
    middleware treats them."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = generate()
            for path in paths:
                for operation in schema["paths"].get(path, {}).values():
                    operation["security"] = []
                    operation["responses"].pop("401", None)
        return app.openapi_schema

    app.openapi = openapi


def unauthorized() -> JSONResponse:
    return JSONResponse(status_code=401, headers={"WWW-Authenticate": "Bearer"},
                        content={"detail": "missing or wrong token: send 'Authorization: Bearer <token>' "
                                           "(search ... --token / MBP_SEARCH_TOKEN)"})


def install_error_handlers(app: FastAPI, api_error: type, bad_input: tuple[type, ...]) -> None:
    """``api_error`` (status, detail, extras) and ``bad_input`` (422, first line) as `ErrorBody`;
    a malformed request as `ValidationBody` whose detail names the first bad field."""

    @app.exception_handler(api_error)
    async def _api_error(_request, exc):
        return JSONResponse(status_code=exc.status, content={"detail": exc.detail, **exc.extra})

    async def _bad_input(_request, exc: Exception):
        return JSONResponse(status_code=422, content={"detail": first_line(exc)})

    for kind in bad_input:
        app.add_exception_handler(kind, _bad_input)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, exc: RequestValidationError):
        found = [{"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", "")), "type": e.get("type")}
                 for e in exc.errors()]
        first = found[0] if found else {"loc": [], "msg": "invalid request"}
        where = ".".join(p for p in first["loc"] if p != "body") or "body"
        return JSONResponse(status_code=422, content={"detail": f"{where}: {first['msg']}",
                                                      "errors": jsonable_encoder(found)})

    @app.exception_handler(HTTPException)
    async def _http(request, exc: HTTPException):
        if exc.status_code == 400:  # a body that is not even text (Starlette's own 400): malformed, as bad JSON is
            return JSONResponse(status_code=422, content={"detail": f"body: {exc.detail}", "errors": [
                {"loc": ["body"], "msg": str(exc.detail), "type": "json_invalid"}]})
        if exc.status_code == 405:  # Starlette names only the first route's methods; a path may have several
            allowed = sorted({m for r in app.router.routes if r.matches(request.scope)[0] == Match.PARTIAL
                              for m in getattr(r, "methods", None) or ()})
            exc = HTTPException(405, exc.detail, headers={**(exc.headers or {}), "Allow": ", ".join(allowed)})
        return await http_exception_handler(request, exc)


__all__ = ["DuplicateBody", "ErrorBody", "SearchSummary", "ValidationBody", "auth_responses", "errors",
           "install_error_handlers", "public", "unauthorized"]
