"""The one interface the rooms use to keep bytes outside the database."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from .keys import StoredFile
from .local import HandedOver, StagingFile


class Storage(Protocol):
    """Bytes under caller-given keys (see :mod:`storage.keys`). Every write is atomic (a reader
    sees the old bytes or the whole new ones); :meth:`commit` and :meth:`put` are also durable
    before they return.

    Received instances stream in through :meth:`staging_file`, and are made durable in steps
    (:meth:`hand_over`, :meth:`sync_staged`, :meth:`commit_synced`) so that the ingest can overlap the
    slowest one with its own work and rename under its index lock; a small instance whose bytes the
    index spools is made visible by :meth:`place` and durable after its acknowledgement by
    :meth:`settle`. Whole objects (key images,
    model outputs, a draft's DICOM objects) go through :meth:`put` and :meth:`put_folder`.
    """

    @property
    def root(self) -> Path:
        """The local folder the keys live under (shown in messages; the export sender resolves
        outbox locations against it)."""
        ...

    def path(self, key: str) -> Path:
        """The local path of ``key``, for readers that open files themselves (pydicom, the renderer)."""
        ...

    def free_bytes(self) -> int:
        """Free space where new keys go."""
        ...

    def staging_file(self, *, memory_first: int = 0, **kwargs: Any) -> StagingFile:
        """A new temporary file to stream an incoming object into (kept in memory up to
        ``memory_first`` bytes, when > 0)."""
        ...

    def hand_over(self, path: Path, *, sync_above: int = -1, memory_ok: bool = False) -> HandedOver:
        """A complete staged file: size, SHA-256 and, when its writer kept them, its bytes (its
        fsync may start meanwhile). With ``memory_ok``, a memory-first file of up to
        ``sync_above`` bytes stays in memory (no file at ``path``)."""
        ...

    def staged_digest(self, path: Path) -> tuple[int, str]:
        """Size and SHA-256 of a staged file (its fsync may start meanwhile)."""
        ...

    def sync_staged(self, staged: Path) -> None:
        """Make a staged file's bytes durable without making it visible."""
        ...

    def commit(self, staged: Path, key: str, *, synced: bool = False) -> None:
        """Make a staged file durable and visible under ``key``."""
        ...

    def commit_synced(self, placements: Sequence[tuple[Path, str]]) -> None:
        """Make staged files whose bytes are durable visible under their keys, durably, all or
        nothing (one fsync per folder)."""
        ...

    def commit_new(self, placements: Sequence[tuple[Path, str]]) -> None:
        """As :meth:`commit_synced`, never replacing a file: :class:`~storage.KeyTaken` when one
        is there. The staged paths may stay (hard links), for their owner to remove."""
        ...

    def write_unsynced(self, entries: Sequence[tuple[bytes, str]]) -> None:
        """Write bytes under keys no reader knows yet, neither atomically nor durably (their
        bytes are durable elsewhere until :meth:`settle`)."""
        ...

    def place(self, placements: Sequence[tuple[Path | bytes, str]]) -> None:
        """Make staged files (or bytes that stayed in memory) visible under their keys without
        making them durable (their bytes are durable elsewhere until :meth:`settle`)."""
        ...

    def settle(self, placements: Sequence[tuple[Path | bytes, str]]) -> None:
        """Make files :meth:`place` or :meth:`write_unsynced` put under their keys durable (each
        file's fsync, each folder's)."""
        ...

    def discard_staged(self, *, process: int | None = None) -> int:
        """Remove staged files a crash left behind (with ``process``: those of that dead
        process only); returns how many."""
        ...

    def put(self, key: str, data: bytes) -> StoredFile:
        """Store ``data`` under ``key``, durably."""
        ...

    def put_folder(self, key: str, files: Mapping[str, bytes]) -> list[str]:
        """Store named files as the folder ``key``, all or nothing, first complete set wins;
        returns the names now in it."""
        ...

    def read(self, key: str) -> bytes:
        """The bytes under ``key``."""
        ...

    def remove(self, key: str) -> None:
        """Delete ``key`` (no error when it is gone)."""
        ...
