"""Time: every timestamp Taqrir stores is an aware UTC datetime."""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> datetime:
    """Aware UTC now."""
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """The same instant as an aware UTC datetime (naive values are taken to be UTC)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
