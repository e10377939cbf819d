"""Staging, hashing and committing files in LocalStorage."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from integrations.dicom.storage import LocalStorage, file_digest


_writers: list[object] = []  # the receiving side holds its writer until the handler returns


def _stage(storage: LocalStorage, data: bytes) -> Path:
    writer = storage.staging_file(delete=False, suffix=".dcm")
    _writers.append(writer)
    for start in range(0, len(data), 70_000):
        writer.write(memoryview(data)[start:start + 70_000])
    path = Path(writer.name)
    assert path.parent == storage.tmp_dir
    return path


def test_staged_digest_overlaps_the_fsync_and_commit_waits_for_it(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "s")
    data = os.urandom(600_000)
    path = _stage(storage, data)
    assert storage.staged_digest(path) == (len(data), hashlib.sha256(data).hexdigest())
    assert str(path) in storage._syncing  # started early, in a helper thread
    storage.sync_staged(path)
    assert storage._syncing == {}
    storage.commit(path, "a/b/c.dcm", synced=True)
    assert (storage.root / "a/b/c.dcm").read_bytes() == data
    assert not path.exists()


def test_a_file_changed_behind_the_writer_is_hashed_as_it_is(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "s")
    path = _stage(storage, b"x" * 1000)
    _writers[-1].file.flush()  # type: ignore[attr-defined]
    with open(path, "ab") as f:
        f.write(b"tail")
    assert storage.staged_digest(path) == file_digest(path)
    assert storage._syncing == {}  # not the writer's bytes: no early fsync, sync_staged does its own
    storage.sync_staged(path)


def test_fsyncs_nobody_waited_for_are_forgotten(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "s")
    refused = _stage(storage, b"a" * 5000)
    storage.staged_digest(refused)
    storage._syncing[str(refused)].result()
    refused.unlink()  # the instance was refused after hashing: nobody calls sync_staged
    accepted = _stage(storage, b"b" * 5000)
    storage.staged_digest(accepted)
    assert list(storage._syncing) == [str(accepted)]
    storage.sync_staged(accepted)
