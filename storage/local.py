"""The ``file://`` backend: every key is a file under one root folder (local, or a mounted shared
filesystem that several hosts see).

Durability (PS3.4 B.2.2 "the SCP ... shall store"): a staged file is fsynced, renamed atomically
into place and its directory fsynced before :meth:`FileStorage.commit` returns, so an
acknowledged instance survives a crash and a reader never sees a half-written file (the one
exception, :meth:`FileStorage.write_unsynced`, writes only keys no reader knows yet). Both fsyncs
stay on every commit: the file's makes its bytes durable, the directory's makes the rename durable
(POSIX promises neither from the other). Measured on this VM's ext4 they cost ~0.7-1 ms together
per 0.5 MB instance; renaming before the file fsync saved only ~0.1 ms and was not worth a
visible-but-not-yet-durable file under its final name.

A staged file's fsync starts as soon as its writer hands it over (:meth:`FileStorage.staged_digest`)
and runs in a helper thread while the file is hashed from the page cache: SHA-256 of 0.5 MB takes
~0.6 ms here and the fsync ~0.65 ms, and both release the GIL, so they overlap instead of adding
up (hashing while receiving put the whole hash on the path of every acknowledgement).

Creating a file is the slowest metadata operation on the VMs measured (0.4-0.7 ms of kernel time
per ``open(O_CREAT)``, against ~0.02 ms for a rename and ~0.13 ms for a small file's fsync), so the
empty files a transfer is staged into are created ahead of time by a helper thread, in a folder of
spares (:data:`SPARE_DIR_NAME`); taking one is a rename into the staging folder. Nothing about
durability changes: a spare holds no data, and a staged file is made durable by its own fsync, its
rename into place and the directory's fsync, as before. A staged file of up to
:data:`KEEP_IN_MEMORY` bytes is also kept in memory by its writer, so that hashing it and reading
its header need not read it back.

A file whose bytes the caller keeps durable elsewhere until then (the listener's spool of small
instances, committed with their index rows) is made visible by :meth:`FileStorage.place` (a
rename, no flush) and durable later by :meth:`FileStorage.settle`: on Linux one ``syncfs(2)``
for a whole batch (one journal commit; an fsync per file cost one each), elsewhere (and on FUSE,
whose daemons may ignore a syncfs) each file's fsync and each folder's.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import io
import itertools
import os
import re
import shutil
import sys
import threading
import uuid
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import KeyTaken, StorageFailure
from .files import SharedFlush, file_digest, fsync_dir
from .keys import StoredFile, check_key

TMP_DIR_NAME = ".incoming"
#: Empty files made ahead of time for staging (see the module docstring); never data.
SPARE_DIR_NAME = ".spare"
#: Spares each process keeps ready, and the level below which its helper makes more.
SPARES = 64
SPARES_LOW = 32
#: Staged files up to this size are also kept in memory by their writer (hashed and parsed from
#: there); a larger one is read back from the page cache.
KEEP_IN_MEMORY = 1 << 20


class StagingFile:
    """A staged file open for writing (unbuffered: every ``write`` reaches the file). ``name`` is
    its path and ``file`` the open file. It counts what is written, so that
    :meth:`FileStorage.hand_over` can tell whether anything else changed the file, and keeps a
    copy of the bytes while they stay within ``keep`` bytes.

    Made with ``fd`` None and an ``open_file`` that creates the file at ``name``, it is memory
    first: nothing reaches the disk until more than ``spill_above`` bytes are written or the file
    is asked for (:meth:`spill`), so that a small instance whose bytes go durably elsewhere (the
    listener's intake journal) costs no file operation before it is answered."""

    def __init__(self, path: str, fd: int | None, keep: int = KEEP_IN_MEMORY, *,
                 open_file: Callable[[], int] | None = None, spill_above: int = 0) -> None:
        self.name = path
        self.file: io.FileIO | None = io.FileIO(fd, "wb", closefd=True) if fd is not None else None
        self.size = 0
        self._keep = keep
        self._copy: bytearray | None = bytearray() if keep > 0 or fd is None else None
        self._open_file = open_file
        self._spill_above = spill_above
        if fd is None and open_file is None:
            raise ValueError("a memory-first staging file needs open_file")

    @property
    def in_memory(self) -> bool:
        """Nothing of it is on disk yet (a memory-first file that has not spilled)."""
        return self.file is None

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data)
        n = len(view)
        if self.file is None:
            assert self._copy is not None
            self._copy += view
            self.size += n
            if self.size > self._spill_above:
                self.spill()
            return n
        _write_all(self.file, view)
        self.size += n
        if self._copy is not None:
            if self.size > self._keep:
                self._copy = None
            else:
                self._copy += view
        return n

    def spill(self) -> None:
        """Put what a memory-first file holds on disk, at its name, and write on from there."""
        if self.file is not None:
            return
        assert self._open_file is not None and self._copy is not None
        self.file = io.FileIO(self._open_file(), "wb", closefd=True)
        _write_all(self.file, memoryview(self._copy))
        if self.size > self._keep:
            self._copy = None

    def flush(self) -> None:
        if self.file is not None:
            self.file.flush()

    def kept(self) -> bytes | None:
        """The bytes written, when they stayed within the size kept in memory."""
        return bytes(self._copy) if self._copy is not None else None

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _write_all(file: io.FileIO, view: memoryview) -> None:
    written, n = 0, len(view)
    while written < n:  # a regular file takes it all at once but for rare short writes
        k = file.write(view[written:])
        written += k or 0


@dataclass(frozen=True)
class HandedOver:
    """A staged file as its writer handed it over: size, SHA-256 and, when the writer kept them in
    memory, its bytes."""

    size: int
    sha256: str
    data: bytes | None
    #: the bytes are only in memory (``data``): no file was made at the staged path
    in_memory: bool = False


class FileStorage:
    """Keys as files under one root folder (see the module docstring for durability)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._root_str = str(root)
        self.tmp_dir = root / TMP_DIR_NAME
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.spare_dir = root / SPARE_DIR_NAME
        self.spare_dir.mkdir(exist_ok=True)
        self._spares = _Spares(self.spare_dir)
        # Staged files still being written or handled, by path; an abandoned transfer's writer
        # drops out when its owner lets go of it.
        self._writing: weakref.WeakValueDictionary[str, StagingFile] = weakref.WeakValueDictionary()
        self._writing_lock = threading.Lock()
        # fsyncs started by staged_digest, waited for by sync_staged
        self._syncing: dict[str, Future[None]] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = 0
        self._folder_syncs = _FolderSyncs()
        #: folders whose own entries (in their parent, and the parent's in its) this process made
        #: durable: a file renamed into another folder syncs those two too
        self._durable_folders: set[str] = set()
        self._names = itertools.count()  # memory-first staging files' names
        _LIVE.add(self)

    def _forked(self) -> None:
        """In a forked child: the parent's helper threads are not here, and a lock one of them
        held at the fork would stay held for ever (``taqrir listen`` forks its receivers after
        crash recovery, which may have started them): fresh locks, no inherited work."""
        self._writing_lock = threading.Lock()
        self._syncing = {}
        self._pool, self._pool_pid = None, 0
        self._folder_syncs = _FolderSyncs()
        self._spares.forked()

    def __repr__(self) -> str:
        return f"FileStorage({str(self.root)!r})"

    @functools.cached_property
    def _syncfs_here(self) -> Callable[[int], int] | None:
        """syncfs, where it makes this storage's files durable: Linux, and not on FUSE, where the
        kernel asks the daemon (FUSE_SYNCFS), a daemon that does not implement it (libfuse 2's,
        exfat-fuse's) answers ENOSYS and syncfs returns 0 all the same, the files still in the
        daemon's hands. Read on first use (only :meth:`settle` needs it), not for every storage
        a request opens."""
        return None if filesystem_type(self.root).startswith("fuse") else _syncfs

    @property
    def syncs_whole_filesystem(self) -> bool:
        """Whether :meth:`settle` makes a batch durable with one ``syncfs`` (else each file's
        fsync and each folder's)."""
        return self._syncfs_here is not None

    def path(self, key: str) -> Path:
        """The local path of a stored key (readers open it directly: pydicom, the renderer)."""
        return self.root / key

    def free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    # -- streamed writes: stage, hash, sync, commit (the listener's path) ----------------------

    def staging_file(self, *, memory_first: int = 0, **kwargs: Any) -> StagingFile:
        """A new empty file in the staging folder, open for writing (a spare made ahead of time,
        renamed there); hand it over with :meth:`hand_over`. With ``memory_first`` > 0 it stays
        in memory until more than that many bytes are written (:class:`StagingFile`; its name is
        reserved all the same). Keyword arguments are accepted for the callers written for
        ``tempfile.NamedTemporaryFile`` and ignored: the file is never deleted on close, and its
        name is ours."""
        del kwargs
        # Not a context manager: the writer owns the file and closes it when the transfer ends.
        if memory_first > 0:
            path = f"{self._root_str}/{TMP_DIR_NAME}/{os.getpid()}-m{next(self._names)}-{os.urandom(4).hex()}"
            writer = StagingFile(path, None, open_file=lambda: self._take_spare(path)[1],
                                 spill_above=memory_first)
        else:
            writer = StagingFile(*self._take_spare())
        with self._writing_lock:
            self._writing[writer.name] = writer
        return writer

    def _take_spare(self, path: str | None = None) -> tuple[str, int]:
        """A spare renamed into the staging folder (as ``path``, or under its own name): its path
        and a descriptor open for writing."""
        name, fd = self._spares.take()
        path = path or f"{self._root_str}/{TMP_DIR_NAME}/{name}"
        try:
            os.replace(f"{self._root_str}/{SPARE_DIR_NAME}/{name}", path)
        except OSError:
            os.close(fd)
            raise
        return path, fd

    def hand_over(self, path: Path, *, sync_above: int = -1, memory_ok: bool = False) -> HandedOver:
        """A staged file, complete: its size, SHA-256 and (when its writer kept them) bytes. For a
        file written through :meth:`staging_file` (and not changed since) of more than
        ``sync_above`` bytes, its fsync starts first, in a helper thread, and overlaps the hashing
        and whatever the caller does next; :meth:`sync_staged` then waits for that fsync instead
        of starting one. (The ingest leaves the fsync of a spooled instance to :meth:`settle`.)

        A memory-first file still in memory (:class:`StagingFile`) of up to ``sync_above`` bytes
        stays there when ``memory_ok`` (:attr:`HandedOver.in_memory`: no file at ``path``; the
        caller keeps its bytes durable and writes them under their key itself); otherwise it is
        put on disk first."""
        with self._writing_lock:
            writer = self._writing.pop(str(path), None)
        data = None
        if writer is not None and writer.in_memory:
            if memory_ok and writer.size <= sync_above:
                data = writer.kept()
                assert data is not None
                return HandedOver(len(data), hashlib.sha256(data).hexdigest(), data, in_memory=True)
            try:
                writer.spill()
            except OSError as err:
                raise StorageFailure(f"could not stage {path.name}: {err.strerror or err}; check {self.root}") from err
        if writer is not None and writer.file is not None:
            try:
                fd = writer.file.fileno()
                if os.fstat(fd).st_size == writer.size:
                    if writer.size > sync_above:
                        self._start_sync(str(path), os.dup(fd))
                    data = writer.kept()
            except (OSError, ValueError):  # ValueError: the writer was already closed
                pass
        if data is not None:
            return HandedOver(len(data), hashlib.sha256(data).hexdigest(), data)
        size, sha = file_digest(path)
        return HandedOver(size, sha, None)

    def staged_digest(self, path: Path) -> tuple[int, str]:
        """Size and SHA-256 of a staged file (:meth:`hand_over` without the bytes)."""
        handed = self.hand_over(path)
        return handed.size, handed.sha256

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

    def discard_staged(self, *, process: int | None = None) -> int:
        """Remove temporary files left by a crash (never acknowledged), and spares. Returns how
        many staged files there were. With ``process``, only those of that process, which has
        died (each staging and spare file's name begins with the pid of the process that made
        it): a receiving process killed mid-transfer left its partial files (a whole-slide
        image's gigabytes) until the listener's next start, however often it was replaced."""
        if process is None:
            removed = _unlink_files(self.tmp_dir)
            self._spares.discard()
            return removed
        prefix = f"{process}-"
        _unlink_files(self.spare_dir, prefix)
        return _unlink_files(self.tmp_dir, prefix)

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
        if not synced:
            self.sync_staged(staged)
        self.commit_synced([(staged, key)])

    def commit_synced(self, placements: Sequence[tuple[Path, str]]) -> None:
        """Rename staged files whose bytes are durable (:meth:`sync_staged`) into place, then make
        the renames durable, fsyncing each folder once however many files went into it (and
        sharing each folder's fsync with concurrent callers: :class:`_FolderSyncs`). All or
        nothing: when one fails, those already renamed go back to their staged paths."""
        self._commit(placements, link=False)

    def commit_new(self, placements: Sequence[tuple[Path, str]]) -> None:
        """As :meth:`commit_synced`, but never replacing a file: each staged file is hard-linked
        under its key (the staged path stays, for its owner to remove), and a key whose file is
        there raises :class:`KeyTaken`. The ingest needs this: when an instance's file name came
        from its bytes alone, an original resent while its correction was indexed was renamed
        over the original's file, which the correction's filing then removed as obsolete, and the
        resend, answered, had no file. Undoing removes only the links made here (before, undoing a
        rename that had replaced a file moved that file, an indexed instance's, away). On a
        filesystem without hard links the staged file is renamed instead (:func:`_link_new`)."""
        self._commit(placements, link=True)

    def _commit(self, placements: Sequence[tuple[Path, str]], *, link: bool) -> None:
        """:meth:`commit_synced` (rename) or :meth:`commit_new` (``link``), all or nothing."""
        placed: list[tuple[Path, str]] = []
        try:
            folders = self._rename_into_place(placements, placed, link=link)
            self._sync_folders(folders)
        except OSError as err:
            for staged, dst in reversed(placed):
                try:
                    if link and os.path.lexists(staged):
                        os.unlink(dst)  # only our own link: the staged path is still there
                    else:  # renamed (commit_synced, or _link_new without hard links): back
                        os.replace(dst, staged)
                except OSError:
                    pass
            what = placements[len(placed)][1] if len(placed) < len(placements) else f"{len(placements)} file(s)"
            if isinstance(err, FileExistsError) and link:
                raise KeyTaken(f"{what} is there already") from err
            raise StorageFailure(f"could not store {what}: {err.strerror or err}; check {self.root}") from err

    def _sync_folders(self, folders: dict[str, None]) -> None:
        for folder in _deepest_first(folders):
            self._folder_syncs.sync(str(folder))
        if len(self._durable_folders) > 100_000:
            self._durable_folders.clear()
        self._durable_folders.update(folders)

    def write_unsynced(self, entries: Sequence[tuple[bytes, str]]) -> None:
        """Write bytes under their keys, not durably: only for bytes durable elsewhere (the intake
        journal) under keys no reader knows yet (their index rows commit after this), which
        :meth:`settle` makes durable later. A new file is written in place (a reader cannot know
        it before its row commits); a key whose file exists is replaced whole, as :meth:`place`
        does. A file left half-written by a crash is written again from those bytes
        (:func:`integrations.dicom.ingest.refile`)."""
        root = self._root_str
        existing: list[tuple[Path | bytes, str]] = []
        try:
            for data, key in entries:
                dst = f"{root}/{key}"
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
                try:
                    fd = os.open(dst, flags, 0o644)
                except FileNotFoundError:
                    os.makedirs(os.path.dirname(dst), exist_ok=True)
                    fd = os.open(dst, flags, 0o644)
                except FileExistsError:  # a reader may hold it: replaced whole, never truncated
                    existing.append((data, key))
                    continue
                with io.FileIO(fd, "wb", closefd=True) as f:
                    _write_all(f, memoryview(data))
        except OSError as err:
            raise StorageFailure(f"could not write {len(entries)} file(s): {err.strerror or err}; "
                                 f"check {self.root}") from err
        if existing:
            self.place(existing)

    def place(self, placements: Sequence[tuple[Path | bytes, str]]) -> None:
        """Rename staged files into place and make nothing durable: for files whose bytes are
        already durable elsewhere (the index's spool, the intake journal), so that readers find
        them at once; :meth:`settle` makes them durable later. A placement of bytes (a staged
        file that stayed in memory: :meth:`hand_over`) is written to a staging file first, so
        that a reader never finds half of it. Not all or nothing: on failure the files before
        the failing one are in place."""
        try:
            files: list[tuple[Path, str]] = []
            for source, key in placements:
                if isinstance(source, Path):
                    files.append((source, key))
                    continue
                path, fd = self._take_spare()
                with io.FileIO(fd, "wb", closefd=True) as f:
                    _write_all(f, memoryview(source))
                files.append((Path(path), key))
            self._rename_into_place(files, [])
        except OSError as err:
            raise StorageFailure(f"could not place {len(placements)} file(s): {err.strerror or err}; "
                                 f"check {self.root}") from err

    def settle(self, placements: Sequence[tuple[Path | bytes, str]]) -> None:
        """Make files that :meth:`place` put under their keys durable: on Linux one ``syncfs`` of
        the filesystem (:attr:`syncs_whole_filesystem`); elsewhere each file's fsync, then every
        folder on the way from the root to each, once (a folder :meth:`place` created must last too), skipping a key whose file is
        gone (removed since: a replaced instance)."""
        if not placements:
            return
        syncfs = self._syncfs_here
        if syncfs is not None:
            try:
                fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    if syncfs(fd) != 0:
                        err = ctypes.get_errno()
                        raise OSError(err, os.strerror(err))
                finally:
                    os.close(fd)
            except OSError as err:
                raise StorageFailure(f"could not make {len(placements)} placed file(s) durable: "
                                     f"{err.strerror or err}; check {self.root}") from err
            return
        folders: dict[Path, None] = {}
        try:
            for _, key in placements:
                try:
                    fd = os.open(self.path(key), os.O_RDONLY)
                except FileNotFoundError:
                    continue
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                folder = self.path(key).parent
                while folder != self.root and self.root in folder.parents:
                    folders[folder] = None
                    folder = folder.parent
            folders[self.root] = None
            for folder in _deepest_first(folders):
                fsync_dir(folder)
        except OSError as err:
            raise StorageFailure(f"could not make {len(placements)} placed file(s) durable: "
                                 f"{err.strerror or err}; check {self.root}") from err

    def _rename_into_place(self, placements: Sequence[tuple[Path, str]],
                           placed: list[tuple[Path, str]], *, link: bool = False) -> dict[str, None]:
        """Rename each staged file to its key (making missing folders), appending to ``placed``
        as it goes; returns the folders whose entries changed. With ``link``, hard-link it there
        instead (or rename it, without hard links: :func:`_link_new`), never replacing a file
        (FileExistsError).

        The hot path of every received instance, so plain strings and no ``stat``: the rename is
        tried first, and only when it fails for want of a folder is the folder made (a folder
        removed behind our back is made again the same way)."""
        folders: dict[str, None] = {}
        root = self._root_str
        move = _link_new if link else os.replace
        for staged, key in placements:
            dst = f"{root}/{key}"
            parent = os.path.dirname(dst)
            try:
                move(staged, dst)
            except FileNotFoundError:
                # the staged file is gone, or the folder is missing (another association may be
                # making it at this moment: asking whether it exists now would race with that)
                if not os.path.exists(staged):
                    raise
                os.makedirs(parent, exist_ok=True)
                # a new folder's entry (and its parent's, which may be new too) must last
                folders[os.path.dirname(parent)] = None
                folders[os.path.dirname(os.path.dirname(parent))] = None
                move(staged, dst)
            placed.append((staged, dst))
            if parent not in folders and parent not in self._durable_folders:
                # A folder another association (or process) made a moment ago: its maker may
                # not have synced the entries that lead to it yet, and this file's answer must
                # not wait on that maker (ext4 without a journal writes each folder's block
                # only when that folder is fsynced).
                folders[os.path.dirname(parent)] = None
                folders[os.path.dirname(os.path.dirname(parent))] = None
            folders[parent] = None
        return folders

    # -- whole objects: key images, model outputs, the draft's DICOM objects -------------------

    def put(self, key: str, data: bytes) -> StoredFile:
        """Store ``data`` under ``key`` durably and atomically (staged, fsynced, renamed, directory
        fsynced): a reader sees the old bytes or the new ones, and the new ones survive a crash."""
        check_key(key)
        staged = self.staging_file(delete=False)
        try:
            staged.write(data)
            staged.close()
            self.commit(Path(staged.name), key)
        except BaseException:
            Path(staged.name).unlink(missing_ok=True)
            raise
        return StoredFile(key=key, size=len(data), sha256=hashlib.sha256(data).hexdigest())

    def put_folder(self, key: str, files: Mapping[str, bytes]) -> list[str]:
        """Store a set of files as the folder ``key``, all or nothing: they are written into a
        private folder that is renamed into place, so a concurrent writer of the same folder never
        sees half a set, and the first complete set wins (a later one is dropped). Returns the
        sorted names of the files now in the folder."""
        check_key(key)
        for name in files:
            if "/" in name or name in ("", ".", ".."):
                raise ValueError(f"file name {name!r} in folder {key!r}: a plain name is expected")
        final = self.path(key)
        staging = self.path(f"{key}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            staging.mkdir(parents=True)
            for name, data in files.items():
                (staging / name).write_bytes(data)
        except OSError as err:
            shutil.rmtree(staging, ignore_errors=True)
            raise StorageFailure(f"could not store {key}: {err.strerror or err}; check {self.root}") from err
        try:
            os.replace(staging, final) if not final.exists() else shutil.rmtree(staging)
        except OSError:  # another writer renamed its set into place first
            shutil.rmtree(staging, ignore_errors=True)
        return sorted(p.name for p in final.iterdir())

    def read(self, key: str) -> bytes:
        """The bytes stored under ``key`` (``FileNotFoundError`` when there are none)."""
        return self.path(key).read_bytes()

    def remove(self, key: str) -> None:
        """Delete a stored key (an instance replaced by different bytes)."""
        try:
            self.path(key).unlink(missing_ok=True)
        except OSError as err:
            raise StorageFailure(f"could not remove {key}: {err}") from err



#: every FileStorage of this process, for :func:`_after_fork_in_child`
_LIVE: weakref.WeakSet[FileStorage] = weakref.WeakSet()


#: what link(2) answers on a filesystem that has no hard links: vfat and exFAT (EPERM), some
#: SMB shares and FUSE filesystems (EOPNOTSUPP, ENOSYS)
_NO_HARD_LINKS = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS})


def _link_new(staged: str | Path, dst: str) -> None:
    """Hard-link ``staged`` as ``dst``, never replacing a file (FileExistsError if one is there).
    Where the filesystem has no hard links, rename it without replacing (:func:`_rename_new`).
    Before, such a storage (an SMB share, a FUSE mount) refused every instance above
    ``listener.spool_max_bytes`` with 0xA700."""
    try:
        os.link(staged, dst)
    except OSError as err:
        if err.errno not in _NO_HARD_LINKS or isinstance(err, (FileExistsError, FileNotFoundError)):
            raise
        _rename_new(staged, dst)


def _rename_new(staged: str | Path, dst: str) -> None:
    """Rename ``staged`` to ``dst`` unless a file is there (FileExistsError): in one step where
    the kernel and the filesystem can (Linux's ``renameat2`` with RENAME_NOREPLACE: in-kernel
    exFAT, vfat, ext4), else a check, then the rename (FUSE daemons on libfuse 2 refuse the flag
    with EINVAL; a container's seccomp filter may refuse the call with EPERM, and a real EPERM
    fails the plain rename alike). Only then can a file appear between the two, and the ingest's
    names are unique by their nonce (``sop.sha16.nonce.dcm``): only a nonce drawn twice for one
    key could race."""
    if _renameat2 is not None:
        if _renameat2(_AT_FDCWD, os.fsencode(staged), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(err, "a file is there already", dst)
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EPERM):  # EPERM: a seccomp filter's refusal
            raise OSError(err, os.strerror(err), dst)
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, "a file is there already", dst)
    os.rename(staged, dst)


def _unlink_files(folder: Path, prefix: str = "") -> int:
    """Remove the files in ``folder`` whose names begin with ``prefix``; how many there were."""
    n = 0
    for p in folder.iterdir():
        if p.name.startswith(prefix) and p.is_file():
            p.unlink(missing_ok=True)
            n += 1
    return n


def _after_fork_in_child() -> None:
    for storage in list(_LIVE):
        storage._forked()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def filesystem_type(path: Path) -> str:
    """The type of the filesystem ``path`` is on (``ext4``, ``fuseblk``...), from the mount
    table of Linux's /proc; "" where there is none."""
    try:
        table = Path("/proc/self/mounts").read_text()
    except OSError:
        return ""
    target = os.path.realpath(path)
    best, kind = "", ""
    for line in table.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        mountpoint = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])  # \040 is a space
        inside = target == mountpoint or target.startswith(mountpoint.rstrip("/") + "/")
        if inside and len(mountpoint) >= len(best):
            best, kind = mountpoint, fields[2]
    return kind


def _load_syncfs() -> Callable[[int], int] | None:
    """Linux's syncfs(2), which makes every file and folder of one filesystem durable in one call
    (one journal commit, where an fsync per file costs one each); None elsewhere. It reports
    writeback errors since Linux 5.8."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_syncfs = _load_syncfs()

_AT_FDCWD = -100  # <fcntl.h>
_RENAME_NOREPLACE = 1  # <linux/fs.h>


def _load_renameat2() -> Callable[[int, bytes, int, bytes, int], int] | None:
    """Linux's renameat2(2) (glibc 2.28 and newer); None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load_renameat2()


class _FolderSyncs:
    """Folder fsyncs shared by concurrent callers (associations renaming instances into one
    series folder), one :class:`~.files.SharedFlush` per folder."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._folders: dict[str, SharedFlush] = {}

    def sync(self, folder: str) -> None:
        """Make the renames already done in ``folder`` durable."""
        with self._lock:
            flush = self._folders.get(folder)
            if flush is None:
                if len(self._folders) >= 4096:  # forget idle folders
                    self._folders = {f: fl for f, fl in self._folders.items() if not fl.idle}
                flush = self._folders[folder] = SharedFlush(functools.partial(fsync_dir, Path(folder)))
            ticket = flush.changed()
        flush.wait(ticket)


def _deepest_first(folders: Iterable[str | Path]) -> list[Path]:
    return sorted((Path(f) for f in folders), key=lambda f: len(f.parts), reverse=True)


class _Spares:
    """Empty files made ahead of time by a helper thread (see the module docstring). Per process:
    a forked child makes its own. The helper leaves after a while without demand (a later take
    starts another), and spares are closed once made, so that idle storages hold neither a thread
    nor descriptors."""

    IDLE = 10.0

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._folder = str(folder)
        self._lock = threading.Lock()
        self._ready: list[str] = []
        self._pid = 0
        self._wanted = threading.Event()
        self._helper: threading.Thread | None = None
        self._names = itertools.count()

    def take(self) -> tuple[str, int]:
        """A spare's name (in the spare folder) and a descriptor open for writing."""
        with self._lock:
            if self._pid != os.getpid():  # a forked child forgets the parent's spares and helper
                self._ready, self._pid, self._helper = [], os.getpid(), None
                self._wanted = threading.Event()
            name = self._ready.pop() if self._ready else None
            if len(self._ready) < SPARES_LOW:
                self._wanted.set()
                if self._helper is None or not self._helper.is_alive():
                    self._helper = threading.Thread(target=self._refill, args=(self._wanted, self._pid),
                                                    name="staging-spares", daemon=True)
                    self._helper.start()
        if name is not None:
            try:
                return name, os.open(f"{self._folder}/{name}", os.O_WRONLY | os.O_CLOEXEC)
            except OSError:  # gone behind our back: make one here
                pass
        return self._create()  # none ready: made here, and kept open

    def _create(self) -> tuple[str, int]:
        name = f"{os.getpid()}-{next(self._names)}-{os.urandom(4).hex()}"
        return name, os.open(f"{self._folder}/{name}", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)

    def _make(self) -> str:
        name, fd = self._create()
        os.close(fd)
        return name

    def _refill(self, wanted: threading.Event, pid: int) -> None:
        while wanted.wait(self.IDLE):
            with self._lock:
                if wanted is not self._wanted or os.getpid() != pid:
                    return  # discarded, or a forked child's copy of this thread
                if len(self._ready) >= SPARES:
                    wanted.clear()
                    continue
            try:
                name = self._make()
            except OSError:  # full disk, gone folder: take() makes its own, and reports
                wanted.clear()
                continue
            with self._lock:
                if wanted is self._wanted:
                    self._ready.append(name)
                    continue
            (self.folder / name).unlink(missing_ok=True)
            return

    def forked(self) -> None:
        """In a forked child (:meth:`FileStorage._forked`): the parent's helper and its lock."""
        self._lock = threading.Lock()
        self._ready, self._pid, self._helper = [], os.getpid(), None
        self._wanted = threading.Event()

    def discard(self) -> None:
        """Remove every spare (this process's and any a crash left)."""
        with self._lock:
            self._ready = []
            self._pid = 0  # the next take() starts over, with a helper of its own
            old, self._wanted = self._wanted, threading.Event()
            old.set()  # the old helper wakes, sees it is no longer wanted and leaves
        _unlink_files(self.folder)
