"""Naive UTC timestamps, as stored in the database (SQLite has no time zones)."""
from __future__ import annotations

from datetime import datetime, timezone


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)
