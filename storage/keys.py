"""Keys: the names callers give what they store (relative, ``/``-separated paths).

Storage does not know what a key means; callers build keys from their own identifiers with
:func:`key_component`, which keeps any identifier a single safe path component.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

_SAFE = re.compile(r"^[0-9A-Za-z.\-_]{1,128}$")


@dataclass(frozen=True)
class StoredFile:
    """A committed file: its key (relative path), size and content hash."""

    key: str
    size: int
    sha256: str


def key_component(name: str) -> str:
    """A key component for an identifier: itself when safe, else its SHA-1 (no traversal, no
    separators, no odd bytes, bounded length)."""
    return name if _SAFE.match(name) and name not in (".", "..") else hashlib.sha1(name.encode(), usedforsecurity=False).hexdigest()


def check_key(key: str) -> None:
    """Refuse a key that would leave the storage root (absolute, empty or ``..`` components)."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"storage key {key!r}: a relative path without empty, '.' or '..' parts is expected")
