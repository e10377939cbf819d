"""Where received instances live: a thin layer over a local folder, named by a ``file://`` URL.

The layer has four verbs (stage a temporary file, commit it under a key, open a key, remove a key)
so that a shared filesystem or an object store can back it later without touching the listener.
Durability (PS3.4 B.2.2 "the SCP ... shall store"): a staged file is fsynced, renamed atomically
into place and its directory fsynced before :meth:`LocalStorage.commit` returns, so an
acknowledged instance survives a crash and a reader never sees a half-written file. Both fsyncs
stay on every commit: the file's makes its bytes durable, the directory's makes the rename durable
(POSIX promises neither from the other). Measured on this VM's ext4 they cost ~0.7-1 ms together
per 0.5 MB instance; renaming before the file fsync saved only ~0.1 ms and was not worth a
visible-but-not-yet-durable file under its final name.

A staged file's fsync starts as soon as its writer hands it over (:meth:`LocalStorage.staged_digest`)
and runs in a helper thread while the file is hashed from the page cache: SHA-256 of 0.5 MB takes
~0.6 ms here and the fsync ~0.65 ms, and both release the GIL, so they overlap instead of adding
up (hashing while receiving put the whole hash on the path of every acknowledgement).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote, urlparse

from ground.errors import ConfigError

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


class StagingFile:
    """A staged file open for writing, standing in for the ``NamedTemporaryFile`` it wraps:
    ``name``, ``file``, ``write`` and ``close`` behave the same; anything else is delegated. It
    counts what is written so :meth:`LocalStorage.staged_digest` can tell whether anything else
    changed the file."""

    def __init__(self, tmp: Any) -> None:
        self._tmp = tmp
        self.name: str = tmp.name
        self.file: IO[bytes] = tmp.file
        # The real file's bound method: the tempfile wrapper's attribute forwarding showed in
        # receive profiles (it runs once per fragment).
        self._write = tmp.file.write
        self.size = 0

    def write(self, data: bytes | memoryview) -> int:
        written = self._write(data)
        self.size += len(data)
        return int(written)

    def close(self) -> None:
        self._tmp.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tmp, name)


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
        # Staged files still being written or handled, by path; an abandoned transfer's writer
        # drops out when its owner lets go of it.
        self._writing: weakref.WeakValueDictionary[str, StagingFile] = weakref.WeakValueDictionary()
        self._writing_lock = threading.Lock()
        # fsyncs started by staged_digest, waited for by sync_staged
        self._syncing: dict[str, Future[None]] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = 0

    @classmethod
    def from_url(cls, url: str) -> LocalStorage:
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

    def staging_file(self, **kwargs: Any) -> StagingFile:
        """A new temporary file in the staging folder (``tempfile.NamedTemporaryFile`` arguments,
        ``dir`` excepted); hand it over with :meth:`staged_digest`."""
        kwargs.pop("dir", None)
        # Not a context manager: the writer owns the file and closes it when the transfer ends.
        writer = StagingFile(tempfile.NamedTemporaryFile(dir=str(self.tmp_dir), **kwargs))  # noqa: SIM115
        with self._writing_lock:
            self._writing[writer.name] = writer
        return writer

    def staged_digest(self, path: Path) -> tuple[int, str]:
        """Size and SHA-256 of a staged file. For a file written through :meth:`staging_file`
        (and not changed since), its fsync starts first, in a helper thread, and overlaps the
        hashing; :meth:`sync_staged` then waits for that fsync instead of starting one."""
        with self._writing_lock:
            writer = self._writing.pop(str(path), None)
        if writer is not None:
            try:
                writer.file.flush()
                fd = writer.file.fileno()
                if os.fstat(fd).st_size == writer.size:
                    self._start_sync(str(path), os.dup(fd))
            except (OSError, ValueError):  # ValueError: the writer was already closed
                pass
        return file_digest(path)

    def _start_sync(self, key: str, fd: int) -> None:
        def sync() -> None:
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

        if self._pool is None or self._pool_pid != os.getpid():  # a forked child makes its own
            self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="staging-fsync")
            self._pool_pid = os.getpid()
        with self._writing_lock:
            # forget fsyncs nobody waited for (their instance was refused after hashing)
            for old in [k for k, f in self._syncing.items() if f.done() and not os.path.exists(k)]:
                del self._syncing[old]
            self._syncing[key] = self._pool.submit(sync)

    def discard_staged(self) -> int:
        """Remove temporary files left by a crash (never acknowledged). Returns how many."""
        n = 0
        for p in self.tmp_dir.iterdir():
            if p.is_file():
                p.unlink(missing_ok=True)
                n += 1
        return n

    def sync_staged(self, staged: Path) -> None:
        """Make a staged file's bytes durable (fsync) without making it visible. The caller may
        do this before taking the index lock, so that concurrent writers overlap their slowest
        step; :meth:`commit` with ``synced=True`` then only renames and fsyncs the directory."""
        with self._writing_lock:
            started = self._syncing.pop(str(staged), None)
        try:
            if started is not None:
                started.result()
                return
            fd = os.open(staged, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as err:
            raise StorageFailure(f"could not store {staged.name}: {err.strerror or err}; check {self.root}") from err

    def commit(self, staged: Path, key: str, *, synced: bool = False) -> None:
        """Make a staged file durable and visible under ``key`` (fsync unless ``synced`` said
        :meth:`sync_staged` already did, rename, fsync dir)."""
        dst = self.path(key)
        if not synced:
            self.sync_staged(staged)
        try:
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
