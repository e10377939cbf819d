"""Choosing the storage backend from ``storage_url``, once, at start."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

from ground.errors import ConfigError

from .local import FileStorage
from .protocol import Storage

SUPPORTED = ("file",)


def open_storage(url: str) -> Storage:
    """The storage named by ``url``: ``file:///path`` (or a bare path) is a local or mounted
    shared folder. Any other scheme is refused with a :class:`ConfigError` (no object-store
    backend is built in: mount the store with a FUSE driver, or use a shared filesystem)."""
    return file_storage(url)


def file_storage(url: str) -> FileStorage:
    """The :class:`FileStorage` of a ``file://`` URL or bare path (``ConfigError`` otherwise)."""
    parsed = urlparse(url)
    if parsed.scheme not in (*SUPPORTED, ""):
        raise ConfigError(
            f"storage_url {url!r}: the {parsed.scheme!r} scheme is not supported; only file:// URLs "
            "(a local or mounted shared folder) are. Mount the object store with a FUSE driver or "
            "use a shared filesystem"
        )
    if parsed.scheme == "file" and parsed.netloc not in ("", "localhost"):
        raise ConfigError(f"storage_url {url!r}: a file:// URL names a local path (file:///path), not host {parsed.netloc!r}")
    path = Path(unquote(parsed.path)) if parsed.scheme == "file" else Path(url)
    return FileStorage(path)
