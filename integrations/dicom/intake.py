"""The intake journal: a small instance is acknowledged once one append to a file is durable.

Until now a small instance's acknowledgement waited for its index transaction: the instance,
study and audit rows and its bytes as a spool row (:mod:`.spool`), committed with one WAL flush.
That commit was most of the per-instance time on one association (``bench/ingest.py``: 45% of
the association thread's wall time, ~0.45 ms of CPU and ~11 WAL pages per 9 kB instance). Here a
small instance's bytes and what is needed to file it again (its key, hash, calling AE, arrival
time) are appended to a journal segment and the segment ``fdatasync``-ed (concurrent appends share
one flush); Success is answered then. The index transaction runs after the answer, in batches, in
the :class:`~.ingest.Ingestor`'s indexing thread; the association's release waits for its own
instances to be indexed, so that a sender that has finished sees every instance it sent in the
index.

A larger instance (above ``listener.spool_max_bytes``) is not copied into the journal: its file
is fsynced and renamed into place, its folder fsynced, and then a record of its key (no bytes) is
journaled; its index transaction runs after the answer as a small one's does. That takes the
index commit (a WAL flush; on PostgreSQL its round trips) off the answer's path, not the file's
two flushes.

So an acknowledged instance is durable as a journal record until its index row has committed and
its file is durable (settled, :mod:`.spool`); then the record is done, and a segment whose records
are all done is deleted. A crash (power loss included) leaves segments with records that may not
be indexed or whose files may be missing: :func:`replay` files each one again, idempotently, and
deletes the segment. The listener runs it before it serves, and its sweeper runs it on segments
left by receiving processes that died (each live process holds an ``flock`` on its own segment).

Segments are preallocated (written with zeros once, then reused): an ``fdatasync`` of bytes
overwritten inside a file flushes data only, where an append must also commit the file's new size
in the filesystem's journal, which under the listener's other flushes (the index's WAL, the
settler's ``syncfs``) waited for them: measured with ``taqrir listen`` and 2,000 small instances
on one association, 2.85 s against 3.3 s. A segment holds a 4 KiB head (``b"TQJS"`` and a random
16-byte epoch), then records; a segment whose records are all done gets a new epoch and is reused,
so the records it held no longer check out.

Record format (little-endian): ``b"TQJ1"``, payload length (u32), CRC-32 of the segment's epoch
and the payload (u32), then the payload: the JSON header's length (u32), the JSON header, the
instance's bytes. A torn last record, or one from an earlier epoch, fails its checks and ends
the segment: it was never acknowledged, or is done.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import json
import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from storage.files import SharedFlush, fsync_dir, write_atomic

log = logging.getLogger(__name__)

#: the journal's folder under the storage root
INTAKE_DIR_NAME = ".intake"
MAGIC = b"TQJ1"
_HEAD = struct.Struct("<4sII")
_U32 = struct.Struct("<I")
SUFFIX = ".journal"
SEGMENT_MAGIC = b"TQJS"
EPOCH_BYTES = 16
HEAD_BYTES = 4096
#: a segment's preallocated size (records go to the next segment once one does not fit)
SEGMENT_BYTES = 16 << 20


#: the folder (under the journal's) where replay sets aside records that can never be filed
UNFILEABLE_DIR_NAME = "unfileable"


class Unfileable(ValueError):
    """A journaled record that can never be filed (its bytes do not match their SHA-256; its file
    is gone and it was never indexed): :func:`replay` sets it aside for a person to look at
    instead of retrying it at every sweep."""


@dataclass(frozen=True)
class Record:
    """One journaled instance: its header (``key``, ``sha256``, ``ae``, ``at``: the arrival time,
    ISO 8601 UTC) and its bytes."""

    header: dict[str, Any]
    data: bytes


@dataclass(eq=False)
class _Segment:
    path: Path
    fd: int
    size: int
    epoch: bytes
    written: int = HEAD_BYTES  # bytes used
    appended: int = 0  # records appended
    done: int = 0  # records done (indexed, file durable)
    #: a flush failed: no more records go here (the region it was to cover may not read back,
    #: and replay stops at the first record that does not)
    broken: bool = False
    #: its descriptor is closed (:meth:`IntakeJournal.close`): a record done later changes nothing
    #: (replay finds it filed), as the number may be another file's by then
    closed: bool = False
    #: the segment's fdatasync, shared by concurrent appends
    flush: SharedFlush = field(init=False)

    def __post_init__(self) -> None:
        self.flush = SharedFlush(functools.partial(os.fdatasync, self.fd))


@dataclass(frozen=True)
class Entry:
    """Where a record went: :meth:`IntakeJournal.done` takes it once the instance is filed."""

    segment: _Segment


def encode(epoch: bytes, header: dict[str, Any], data: bytes) -> bytes:
    meta = json.dumps(header, separators=(",", ":")).encode()
    payload = b"".join((_U32.pack(len(meta)), meta, data))
    return _HEAD.pack(MAGIC, len(payload), zlib.crc32(payload, zlib.crc32(epoch))) + payload


def _head(epoch: bytes) -> bytes:
    return (SEGMENT_MAGIC + epoch).ljust(HEAD_BYTES, b"\0")


def read_records(blob: bytes) -> Iterator[Record]:
    """The valid records of a segment's bytes, in order, up to the first torn, absent or stale
    (earlier epoch) one."""
    if len(blob) < HEAD_BYTES or not blob.startswith(SEGMENT_MAGIC):
        return
    epoch = blob[len(SEGMENT_MAGIC):len(SEGMENT_MAGIC) + EPOCH_BYTES]
    seed = zlib.crc32(epoch)
    pos = HEAD_BYTES
    while pos + _HEAD.size <= len(blob):
        magic, length, crc = _HEAD.unpack_from(blob, pos)
        start = pos + _HEAD.size
        if magic != MAGIC or start + length > len(blob):
            return
        payload = memoryview(blob)[start:start + length]
        if zlib.crc32(payload, seed) != crc or length < _U32.size:
            return
        (meta_len,) = _U32.unpack_from(payload)
        if _U32.size + meta_len > length:
            return
        header = json.loads(bytes(payload[_U32.size:_U32.size + meta_len]))
        yield Record(header, bytes(payload[_U32.size + meta_len:]))
        pos = start + length


class IntakeJournal:
    """This process's journal segments in ``folder`` (a forked child opens its own on first use).

    :meth:`append` returns once the record is durable; :meth:`done` marks it filed. Thread-safe.
    """

    def __init__(self, folder: Path, *, segment_bytes: int = SEGMENT_BYTES) -> None:
        self.folder = folder
        self.segment_bytes = segment_bytes
        self._lock = threading.Lock()
        self._current: _Segment | None = None
        self._spares: list[_Segment] = []  # all done, new epoch: reusable
        self._pid = 0

    def open(self) -> None:
        """Have a segment ready (preallocating it takes a moment), e.g. before serving."""
        with self._lock:
            self._segment(0)

    def append(self, header: dict[str, Any], data: bytes) -> Entry:
        """Append one record and wait until it is durable (sharing the flush with concurrent
        appends). Raises OSError when it cannot be written or flushed: nothing was then
        acknowledged."""
        with self._lock:
            seg = self._segment(len(data) + 4096)
            record = encode(seg.epoch, header, data)
            if seg.written + len(record) > seg.size:
                seg = self._segment(len(record), rotate=True)
                record = encode(seg.epoch, header, data)
            wrote = os.pwrite(seg.fd, record, seg.written)
            if wrote != len(record):  # (a copy-on-write filesystem out of space, say): torn
                seg.broken = True
                raise OSError(errno.ENOSPC, f"only {wrote} of a journal record's {len(record)} bytes were written")
            seg.written += len(record)
            seg.appended += 1
            ticket = seg.flush.changed()
        try:
            seg.flush.wait(ticket)
            if seg.flush.failed is not None:
                # flushed after another record's flush failed: that region may not read back,
                # and replay stops there, so this record may be unreachable too
                raise OSError(errno.EIO, f"a flush of journal segment {seg.path.name} failed: {seg.flush.failed}")
        except OSError:
            with self._lock:
                seg.broken = True  # the next append starts another segment
                seg.done += 1  # refused: the sender sends it again
                self._recycle_if_done(seg)
            raise
        return Entry(seg)

    def done(self, entry: Entry) -> None:
        """The instance of ``entry`` is filed and its file durable: its record is no longer needed."""
        with self._lock:
            seg = entry.segment
            seg.done += 1
            self._recycle_if_done(seg)

    def _recycle_if_done(self, seg: _Segment) -> None:  # under _lock
        """Recycle ``seg`` once all its records are done, unless it is still being appended to,
        is closed (its descriptor may be another file's by now) or is a forked parent's."""
        if not seg.closed and seg is not self._current and seg.done >= seg.appended and self._pid == os.getpid():
            self._recycle(seg)

    def pending(self) -> int:
        """Records of the open segment not done yet (the tests read it)."""
        with self._lock:
            segs = [] if self._current is None else [self._current]
            return sum(seg.appended - seg.done for seg in segs)

    def close(self) -> None:
        """Close the segments: deleted when every record in them is done, else kept for
        :func:`replay`."""
        with self._lock:
            if self._pid != os.getpid():
                self._current, self._spares = None, []
                return
            for seg in [*self._spares, *([self._current] if self._current else [])]:
                seg.closed = True
                if seg.done >= seg.appended:
                    _retire(seg)
                else:
                    os.close(seg.fd)  # releases the flock: replay may take it
            self._current, self._spares = None, []

    def _segment(self, need: int, *, rotate: bool = False) -> _Segment:
        """The open segment (under ``_lock``); with ``rotate``, the next one (a spare, or a new
        one) while the last is retired or recycled once its records are done."""
        if self._pid != os.getpid():  # a forked child: the parent's segments are not ours
            self._pid, self._current, self._spares = os.getpid(), None, []
        seg = self._current
        if seg is not None and not rotate and not seg.broken:
            return seg
        if seg is not None and seg.done >= seg.appended:
            self._recycle(seg)
        size = max(self.segment_bytes, HEAD_BYTES + need)
        fresh = next((sp for sp in self._spares if sp.size >= size), None)
        if fresh is not None:
            self._spares.remove(fresh)
        else:
            fresh = _open_segment(self.folder, size)
        self._current = fresh
        return fresh

    def _recycle(self, seg: _Segment) -> None:
        """A segment whose records are all done becomes a spare under a new epoch (one flush), or
        is deleted when there are spares enough."""
        if seg.broken or len(self._spares) >= 1:
            _retire(seg)
            return
        epoch = os.urandom(EPOCH_BYTES)
        os.pwrite(seg.fd, _head(epoch), 0)
        os.fdatasync(seg.fd)
        self._spares.append(_Segment(seg.path, seg.fd, seg.size, epoch))


def _open_segment(folder: Path, size: int) -> _Segment:
    """A new, locked, preallocated segment whose name is durable. It is created under a name
    :func:`replay` ignores and locked before it is renamed into view, so that replay never takes
    a live process's segment for a dead one's."""
    if not folder.is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        fsync_dir(folder.parent)
    name = f"{os.getpid()}-{os.urandom(6).hex()}"
    tmp = folder / f"{name}.new"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        epoch = os.urandom(EPOCH_BYTES)
        zeros = bytes(1 << 20)
        os.write(fd, _head(epoch))
        for offset in range(HEAD_BYTES, size, len(zeros)):
            os.write(fd, zeros[:min(len(zeros), size - offset)])
        os.fsync(fd)
        path = folder / f"{name}{SUFFIX}"
        os.rename(tmp, path)
        fsync_dir(folder)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    return _Segment(path, fd, size, epoch)


def _retire(seg: _Segment) -> None:
    """Delete a segment whose records are all done (no flush: were the deletion lost, replay
    finds every record filed)."""
    try:
        seg.path.unlink(missing_ok=True)
    finally:
        os.close(seg.fd)


def replay(folder: Path, refile: Callable[[Record], None]) -> int:
    """File again (``refile``, idempotent) every record of the segments in ``folder`` that no live
    process holds, then delete those segments. A record whose ``refile`` raises keeps its segment
    (replayed next time; the error is logged), unless it raises :class:`Unfileable`: such a record
    is copied, as a segment of its own, into ``folder/unfileable/`` (logged as an error once) and
    not retried. Returns how many records were read."""
    if not folder.is_dir():
        return 0
    for stale in folder.glob("*.new"):  # a segment never renamed into view held no record
        _drop_if_abandoned(stale)
    count = 0
    for path in sorted(folder.glob(f"*{SUFFIX}")):
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live process's
            if os.fstat(fd).st_nlink == 0:
                continue  # retired meanwhile
            with os.fdopen(os.dup(fd), "rb") as f:
                blob = f.read()
            failed = 0
            unfileable: list[Record] = []
            for record in read_records(blob):
                count += 1
                try:
                    refile(record)
                except Unfileable as e:
                    unfileable.append(record)
                    log.error("journaled instance %s can never be filed (%s): set aside in %s for a person "
                              "to look at (read it with integrations.dicom.intake.read_records)",
                              record.header.get("key"), e, folder / UNFILEABLE_DIR_NAME / path.name)
                except Exception:
                    failed += 1
                    log.exception("could not file journaled instance %s again; its segment %s stays for "
                                  "the next replay", record.header.get("key"), path.name)
            if unfileable:
                _set_aside(folder / UNFILEABLE_DIR_NAME, path.name, unfileable)
            if not failed:
                path.unlink(missing_ok=True)
        finally:
            os.close(fd)
    return count


def _set_aside(folder: Path, name: str, records: list[Record]) -> None:
    """Write ``records`` durably as the segment ``folder/name`` (replacing one of that name: a
    segment kept for a record that failed otherwise sets the same records aside again)."""
    epoch = os.urandom(EPOCH_BYTES)
    write_atomic(folder / name, _head(epoch) + b"".join(encode(epoch, r.header, r.data) for r in records))
    fsync_dir(folder)


def _drop_if_abandoned(path: Path) -> None:
    """Delete a segment left under its creation name, unless it is young (being opened: its
    creator locks it right after creating it) or locked."""
    try:
        if time.time() - path.stat().st_mtime < 60:
            return
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        path.unlink(missing_ok=True)
    except BlockingIOError:
        pass
    finally:
        os.close(fd)
