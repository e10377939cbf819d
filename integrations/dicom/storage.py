"""Where received instances live: a thin layer over a local folder, named by a ``file://`` URL.

The layer has four verbs (stage a temporary file, commit it under a key, open a key, remove a key)
so that a shared filesystem or an object store can back it later without touching the listener.
Durability (PS3.4 B.2.2 "the SCP ... shall store"): a staged file is fsynced, renamed atomically
into place and its directory fsynced before :meth:`LocalStorage.commit` returns, so an
acknowledged instance survives a crash and a reader never sees a half-written file.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from taqrir.errors import ConfigError

from .errors import StorageFailure

_SAFE = re.compile(r"^[0-9A-Za-z.\-_]{1,128}$")
TMP_DIR_NAME = ".incoming"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class StoredFile:
    """A committed file: its key (relative path), size and content hash."""

    key: str
    size: int
    sha256: str


def file_digest(path: Path) -> tuple[int, str]:
    """Size and SHA-256 of a file, read in 1 MiB chunks (never whole in memory)."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def _component(uid: str) -> str:
    """A path component for a UID: itself when safe, else a hash (no traversal, no odd bytes)."""
    return uid if _SAFE.match(uid) and uid not in (".", "..") else hashlib.sha1(uid.encode()).hexdigest()


def instance_key(study_uid: str, series_uid: str, sop_uid: str, sha256: str) -> str:
    """Content-addressed key: a replacement gets a new file, so the old one stays valid until the
    index points at the new one (no window where the row and the file disagree)."""
    return f"{_component(study_uid)}/{_component(series_uid)}/{_component(sop_uid)}.{sha256[:16]}.dcm"


class LocalStorage:
    """Instances under one root folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp_dir = root / TMP_DIR_NAME
        self.tmp_dir.mkdir(parents=True, exist_ok=True)

    @classmethod
    def from_url(cls, url: str) -> "LocalStorage":
        parsed = urlparse(url)
        if parsed.scheme not in ("file", ""):
            raise ConfigError(
                f"storage_url {url!r}: only file:// URLs (a local or mounted shared folder) are "
                "supported; mount the object store with a FUSE driver or use a shared filesystem"
            )
        path = Path(unquote(parsed.path)) if parsed.scheme == "file" else Path(url)
        return cls(path)

    def path(self, key: str) -> Path:
        """The local path of a stored key."""
        return self.root / key

    def free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def discard_staged(self) -> int:
        """Remove temporary files left by a crash (never acknowledged). Returns how many."""
        n = 0
        for p in self.tmp_dir.iterdir():
            if p.is_file():
                p.unlink(missing_ok=True)
                n += 1
        return n

    def commit(self, staged: Path, key: str) -> None:
        """Make a staged file durable and visible under ``key`` (fsync, rename, fsync dir)."""
        dst = self.path(key)
        try:
            fd = os.open(staged, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            new_dirs = not dst.parent.exists()
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, dst)
            _fsync_dir(dst.parent)
            if new_dirs:
                _fsync_dir(dst.parent.parent)
                _fsync_dir(dst.parent.parent.parent)
        except OSError as err:
            raise StorageFailure(f"could not store {key}: {err.strerror or err}; check {self.root}") from err

    def remove(self, key: str) -> None:
        """Delete a stored key (an instance replaced by different bytes)."""
        try:
            self.path(key).unlink(missing_ok=True)
        except OSError as err:
            raise StorageFailure(f"could not remove {key}: {err}") from err


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
