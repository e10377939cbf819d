"""Dates and times as FHIR R4 writes them."""

from __future__ import annotations

from datetime import UTC, datetime, tzinfo


def study_datetime(value: datetime | None, study_timezone: tzinfo) -> str | None:
    """A DICOM study date/time as FHIR dateTime. DICOM gives local time without an offset
    (PS3.3 C.7.2.1 Study Date/Time); FHIR requires one when a time is given (R4 datatypes,
    dateTime), so naive values are read in ``study_timezone``."""
    if value is None:
        return None
    aware = value.replace(tzinfo=study_timezone) if value.tzinfo is None else value
    return aware.isoformat(timespec="seconds")


def instant(value: datetime) -> str:
    """An aware datetime as FHIR instant in UTC (naive values are taken to be UTC)."""
    aware = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return aware.isoformat(timespec="milliseconds").replace("+00:00", "Z")
