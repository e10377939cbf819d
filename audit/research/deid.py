"""De-identification of exported rows (pure): keyed-hash pseudonyms, the date policy, ages.

Identifiers become HMAC-SHA256 pseudonyms under the site's secret key (a plain hash of a Patient
ID or a Study Instance UID can be confirmed by anyone who has the identifier; a keyed hash cannot
without the key). Names, birth dates, accession numbers, descriptions and UIDs are never exported.
Dates follow :class:`~audit.research.config.DatePolicy`; ages over 89 are reported as 90, as the
HIPAA Safe Harbor method asks (45 CFR 164.514(b)(2)(i)(C)).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from datetime import date, datetime, timedelta

from .config import DatePolicy

_AGE = re.compile(r"^(\d{3})([DWMY])$")
_DAYS_PER = {"D": 1.0, "W": 7.0, "M": 30.4375, "Y": 365.25}


@dataclass(frozen=True)
class Deidentifier:
    """Pseudonyms and dates for one export (one key, one policy)."""

    key: bytes
    dates: DatePolicy
    shift_max_days: int = 365

    def pseudonym(self, kind: str, *parts: str) -> str:
        """32 hex characters naming ``parts`` of ``kind`` (patient, study, draft, reviewer...)."""
        msg = "\x1f".join((kind, *parts)).encode("utf-8")
        return hmac.new(self.key, msg, hashlib.sha256).hexdigest()[:32]

    def shift_days(self, patient: str) -> int:
        """The per-patient offset of the ``shifted`` policy (same patient, same offset)."""
        digest = hmac.new(self.key, b"date-shift\x1f" + patient.encode("utf-8"), hashlib.sha256).digest()
        span = 2 * self.shift_max_days + 1
        return int.from_bytes(digest[:8], "big") % span - self.shift_max_days

    def day(self, value: date | datetime | None, patient: str) -> str | None:
        """A date under the policy: ISO date, the year alone, or None."""
        if value is None or self.dates == "none":
            return None
        d = value.date() if isinstance(value, datetime) else value
        if self.dates == "year":
            return f"{d.year:04d}"
        if self.dates == "shifted":
            d = d + timedelta(days=self.shift_days(patient))
        return d.isoformat()

    def instant(self, value: datetime | None, patient: str) -> str | None:
        """A timestamp under the policy: ISO 8601 UTC (full/shifted), the year alone, or None."""
        if value is None or self.dates == "none":
            return None
        if self.dates == "year":
            return f"{value.year:04d}"
        if self.dates == "shifted":
            value = value + timedelta(days=self.shift_days(patient))
        return value.isoformat()


def age_years(dicom_age: str | None) -> int | None:
    """A DICOM AS value (``045Y``, ``018M``, ``006W``, ``003D``; PS3.5 6.2) in whole years, with
    anything over 89 reported as 90."""
    if not dicom_age:
        return None
    m = _AGE.match(dicom_age.strip())
    if m is None:
        return None
    years = int(int(m.group(1)) * _DAYS_PER[m.group(2)] // 365.25)
    return min(years, 90)
