"""One-line error messages: what users see is the first line of an exception, never a traceback."""
from __future__ import annotations


def first_line(exc: BaseException | str, limit: int | None = None) -> str:
    """The first non-empty line of ``exc`` (its type name when it has no message)."""
    lines = str(exc).strip().splitlines()
    text = lines[0].strip() if lines else (type(exc).__name__ if isinstance(exc, BaseException) else "")
    return text if limit is None or len(text) <= limit else text[: limit - 1] + "…"


def typed_line(exc: BaseException, limit: int | None = None) -> str:
    """``Type: first line`` (just ``Type`` without a message): for errors of code we do not own,
    whose type says more than their message."""
    name = type(exc).__name__
    return f"{name}: {first_line(exc, limit)}" if str(exc).strip() else name
