"""Durable file primitives shared by the storage backend and by the folders Taqrir writes for
people (a draft's export folder): hash a file, fsync a directory, replace a file atomically.

POSIX makes neither the bytes of a file nor a rename durable by itself: the file's fsync makes its
bytes durable, its directory's fsync the rename. Both are done wherever a file must survive a crash.
"""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

_CHUNK = 1 << 20


def file_digest(path: Path) -> tuple[int, str]:
    """Size and SHA-256 of a file, read in 1 MiB chunks (never whole in memory)."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make the renames and creations inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the whole new one (the
    bytes are fsynced before the rename; the directory is not: callers that need the name itself
    to survive a crash use :meth:`storage.FileStorage.put`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class SharedFlush:
    """One flush shared by concurrent writers of one target (a file's data, a folder's entries).

    A writer notes its change once it is made (:meth:`changed`, which returns a ticket), then
    waits for it to be durable (:meth:`wait`). The first waiter runs ``flush`` for every change
    noted before it started; a waiter whose change such a flush covered returns at once, so that
    N concurrent writers cost one or two flushes instead of N.
    """

    def __init__(self, flush: Callable[[], None]) -> None:
        self._flush = flush
        self._lock = threading.Lock()
        self._flushing = threading.Lock()
        self._changes = 0
        self._flushed = 0
        #: changes (tickets) in (_failed_from, _failed_upto] were to be covered by a flush that
        #: failed; _failure is the last such flush's error
        self._failed_from = 0
        self._failed_upto = 0
        self._failure: BaseException | None = None

    def changed(self) -> int:
        """Note a change made; returns the ticket to :meth:`wait` on."""
        with self._lock:
            self._changes += 1
            return self._changes

    def wait(self, ticket: int) -> None:
        """Return once the change of ``ticket`` is durable (flushing it, or waiting for a flush
        that covers it). Raises what ``flush`` raises, to every waiter whose change the failed
        flush was to cover: flushing again would not do, as Linux reports a writeback error
        once and may have dropped the pages (a second fsync returns 0), so a waiter that ran
        its own flush after the failure was told its change was durable when it may not be."""
        # _flushed read before the failures: a flush after a failed one advances it only once
        # that failure is recorded, so a change the failed flush covered is never seen as flushed
        flushed = self._flushed
        self._check(ticket)
        if flushed >= ticket:
            return
        with self._flushing:
            self._check(ticket)
            if self._flushed >= ticket:
                return  # a flush that started after our change covered it
            with self._lock:
                target = self._changes
            start = self._flushed
            try:
                self._flush()
            except BaseException as err:
                self._failed_from = start if self._failure is None else min(self._failed_from, start)
                self._failed_upto = target
                self._failure = err
                raise
            self._flushed = target

    def _check(self, ticket: int) -> None:
        failure = self._failure
        if failure is not None and self._failed_from < ticket <= self._failed_upto:
            raise OSError(errno.EIO, f"the flush that was to make this change durable failed: {failure}") \
                from failure

    @property
    def failed(self) -> BaseException | None:
        """The error of the last flush that failed, if one did."""
        return self._failure

    @property
    def idle(self) -> bool:
        """No change waits for a flush."""
        return self._flushed >= self._changes
