"""Errors of the storage room."""

from __future__ import annotations

from ground.errors import TransientError


class StorageFailure(TransientError):
    """The filesystem refused a write, a rename or a removal (full, read-only, gone): worth retrying
    once the cause is fixed. The edges map it (the listener answers C-STORE 0xA700, "Out of
    resources", so that the sender retries later)."""


class KeyTaken(StorageFailure):
    """A file is already there, and the caller asked never to replace one
    (:meth:`storage.FileStorage.commit_new`)."""
