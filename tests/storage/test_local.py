"""Staging, hashing and committing files in FileStorage."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import sys
import time
from pathlib import Path

import pytest

from ground.errors import ConfigError
from storage import (
    FileStorage,
    KeyTaken,
    StorageFailure,
    StoredFile,
    file_digest,
    key_component,
    local,
    open_storage,
    write_atomic,
)
from tests.factories.exfat import mounted_exfat

_writers: list[object] = []  # the receiving side holds its writer until the handler returns


def _stage(storage: FileStorage, data: bytes) -> Path:
    writer = storage.staging_file(delete=False, suffix=".dcm")
    _writers.append(writer)
    for start in range(0, len(data), 70_000):
        writer.write(memoryview(data)[start:start + 70_000])
    path = Path(writer.name)
    assert path.parent == storage.tmp_dir
    return path


def test_staged_digest_overlaps_the_fsync_and_commit_waits_for_it(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "s")
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
    storage = FileStorage(tmp_path / "s")
    path = _stage(storage, b"x" * 1000)
    _writers[-1].file.flush()  # type: ignore[attr-defined]
    with open(path, "ab") as f:
        f.write(b"tail")
    assert storage.staged_digest(path) == file_digest(path)
    assert storage._syncing == {}  # not the writer's bytes: no early fsync, sync_staged does its own
    storage.sync_staged(path)


def test_fsyncs_nobody_waited_for_are_forgotten(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "s")
    refused = _stage(storage, b"a" * 5000)
    storage.staged_digest(refused)
    storage._syncing[str(refused)].result()
    refused.unlink()  # the instance was refused after hashing: nobody calls sync_staged
    accepted = _stage(storage, b"b" * 5000)
    storage.staged_digest(accepted)
    assert list(storage._syncing) == [str(accepted)]
    storage.sync_staged(accepted)


def test_put_is_atomic_durable_and_read_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = FileStorage(tmp_path / "s")
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    stored = storage.put("exports/1.2.3/d1/sr.dcm", b"first")
    assert stored == StoredFile(key="exports/1.2.3/d1/sr.dcm", size=5, sha256=hashlib.sha256(b"first").hexdigest())
    # the staged file's bytes, then the new folders from the file's up (the rename, the mkdirs)
    assert synced[1:] == [str(storage.root / "exports/1.2.3/d1"), str(storage.root / "exports/1.2.3"),
                          str(storage.root / "exports")]
    storage.put("exports/1.2.3/d1/sr.dcm", b"second")
    assert storage.read("exports/1.2.3/d1/sr.dcm") == b"second"
    assert list(storage.tmp_dir.iterdir()) == []  # nothing staged is left behind


def test_keys_that_leave_the_root_are_refused(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "s")
    for key in ("../x", "/etc/passwd", "a//b", "a/./b", ""):
        with pytest.raises(ValueError, match="storage key"):
            storage.put(key, b"x")
    with pytest.raises(ValueError, match="plain name"):
        storage.put_folder("k", {"../x.png": b"x"})
    assert not (tmp_path / "x").exists()
    assert key_component("1.2.840.10008.1") == "1.2.840.10008.1"
    assert key_component("..") == hashlib.sha1(b"..").hexdigest()
    assert key_component("a/../b") == hashlib.sha1(b"a/../b").hexdigest()


def test_put_folder_is_all_or_nothing_and_the_first_set_wins(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "s")
    first = {"01-a.png": b"a", "provenance.json": b"{}"}
    assert storage.put_folder("keyimages/1.2/v1-abc", first) == ["01-a.png", "provenance.json"]
    # a second delivery's set (here a different one, to tell them apart) is dropped
    assert storage.put_folder("keyimages/1.2/v1-abc", {"01-b.png": b"b"}) == ["01-a.png", "provenance.json"]
    assert storage.read("keyimages/1.2/v1-abc/01-a.png") == b"a"
    assert sorted(p.name for p in (storage.root / "keyimages/1.2").iterdir()) == ["v1-abc"]  # no staging left


def test_a_write_the_filesystem_refuses_is_a_storage_failure(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "s")
    (storage.root / "blocked").write_bytes(b"a file where a folder is needed")
    with pytest.raises(StorageFailure, match="could not store blocked/x"):
        storage.put("blocked/x", b"x")
    with pytest.raises(StorageFailure, match="could not store blocked/f"):
        storage.put_folder("blocked/f", {"a": b"a"})
    assert list(storage.tmp_dir.iterdir()) == []


def test_the_url_chooses_the_backend_and_other_schemes_are_refused(tmp_path: Path) -> None:
    opened = open_storage((tmp_path / "a b").as_uri())
    assert isinstance(opened, FileStorage) and opened.root == tmp_path / "a b"
    assert open_storage(str(tmp_path / "c")).root == tmp_path / "c"  # a bare path
    for url in ("s3://bucket/taqrir", "gs://b/p", "http://host/x"):
        with pytest.raises(ConfigError, match="only file:// URLs"):
            open_storage(url)
    with pytest.raises(ConfigError, match="not host"):
        open_storage("file://nas/srv/taqrir")


def test_write_atomic_replaces_a_file_whole(tmp_path: Path) -> None:
    path = tmp_path / "out" / "draft.json"
    write_atomic(path, b"old")
    write_atomic(path, b"new")
    assert path.read_bytes() == b"new"
    assert [p.name for p in path.parent.iterdir()] == ["draft.json"]


def test_a_memory_first_staging_file_touches_the_disk_only_past_its_threshold(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "s")
    small = storage.staging_file(memory_first=1000)
    small.write(b"a" * 600)
    small.write(b"b" * 400)  # 1000: not past the threshold
    path = Path(small.name)
    assert path.parent == storage.tmp_dir and not path.exists()
    assert small.in_memory
    handed = storage.hand_over(path, sync_above=1000, memory_ok=True)
    assert handed.in_memory and handed.data == b"a" * 600 + b"b" * 400
    assert handed.sha256 == hashlib.sha256(handed.data).hexdigest()
    assert not path.exists() and list(storage.tmp_dir.iterdir()) == []
    small.close()

    big = storage.staging_file(memory_first=1000)
    big.write(b"c" * 900)
    big.write(b"d" * 200)  # past it: spilled, everything so far on disk, and written on from there
    big.write(b"e" * 10)
    big.flush()
    assert not big.in_memory
    assert Path(big.name).read_bytes() == b"c" * 900 + b"d" * 200 + b"e" * 10
    handed = storage.hand_over(Path(big.name), sync_above=1000, memory_ok=True)
    assert not handed.in_memory and handed.data == Path(big.name).read_bytes()
    big.close()


def test_a_memory_first_file_is_put_on_disk_when_its_taker_needs_the_file(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "s")
    for memory_ok, sync_above in ((False, 1000), (True, 100)):  # not asked for, or too big to stay
        writer = storage.staging_file(memory_first=1000)
        writer.write(b"x" * 500)
        path = Path(writer.name)
        handed = storage.hand_over(path, sync_above=sync_above, memory_ok=memory_ok)
        assert not handed.in_memory and handed.data == b"x" * 500
        assert path.read_bytes() == b"x" * 500
        writer.close()


def test_place_writes_bytes_under_their_key_beside_renamed_files(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "s")
    staged = _stage(storage, b"renamed")
    _writers[-1].close()  # type: ignore[attr-defined]
    storage.place([(staged, "s1/a.dcm"), (b"from memory", "s2/deeper/b.dcm")])
    assert (storage.root / "s1/a.dcm").read_bytes() == b"renamed"
    assert (storage.root / "s2/deeper/b.dcm").read_bytes() == b"from memory"
    assert not staged.exists() and list(storage.tmp_dir.iterdir()) == []
    storage.settle([(staged, "s1/a.dcm"), (b"from memory", "s2/deeper/b.dcm")])


def test_write_unsynced_writes_bytes_under_keys_making_folders(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "s")
    (storage.root / "old").mkdir()
    (storage.root / "old/x.dcm").write_bytes(b"a file a reader may hold")
    held = open(storage.root / "old/x.dcm", "rb")  # noqa: SIM115 - closed below
    storage.write_unsynced([(b"new", "new/deeper/a.dcm"), (b"again", "old/x.dcm")])
    assert (storage.root / "new/deeper/a.dcm").read_bytes() == b"new"
    assert (storage.root / "old/x.dcm").read_bytes() == b"again"
    with held:  # an existing file is replaced whole, never truncated under its reader
        assert held.read() == b"a file a reader may hold"
    assert list(storage.tmp_dir.iterdir()) == []
    with pytest.raises(StorageFailure, match="could not write 1 file"):  # a file where a folder must be
        storage.write_unsynced([(b"x", "old/x.dcm/y.dcm")])


def test_a_folder_another_writer_makes_meanwhile_does_not_fail_the_rename(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Associations placing the first files of a new series folder at once: one's rename fails
    for want of the folder, which another makes before the first looks. (Asking whether the
    folder exists then, to tell a missing folder from a missing staged file, refused the
    instance with 0xA700: seen with four CT associations in bench/ingest.py.)"""
    import storage.local as local

    storage = FileStorage(tmp_path / "s")
    staged = _stage(storage, b"slice")
    _writers[-1].close()  # type: ignore[attr-defined]
    real_replace = os.replace
    raced: list[int] = []

    def replace(src: str, dst: str) -> None:
        if not raced and not os.path.isdir(os.path.dirname(dst)):
            raced.append(1)
            os.makedirs(os.path.dirname(dst))  # the other association, in between
            raise FileNotFoundError(2, "No such file or directory", dst)
        real_replace(src, dst)

    monkeypatch.setattr(local.os, "replace", replace)
    storage.commit_synced([(staged, "series/new/a.dcm")])
    assert raced and (storage.root / "series/new/a.dcm").read_bytes() == b"slice"


def test_commit_new_never_replaces_a_file_and_undoes_only_its_own(tmp_path: Path) -> None:
    """The ingest's placement (an instance's file is named by its bytes, so two copies of one
    instance share a name): a file that is there stays, whatever the new one holds; the staged
    path stays for its owner; a failed batch removes only the links it made."""
    storage = FileStorage(tmp_path / "s")
    storage.put("a/b/kept.dcm", b"indexed")
    first, second = _stage(storage, b"new one"), _stage(storage, b"other")
    for path in (first, second):
        storage.sync_staged(path)
    with pytest.raises(KeyTaken, match=r"a/b/kept\.dcm is there already"):
        storage.commit_new([(first, "a/b/fresh.dcm"), (second, "a/b/kept.dcm")])
    assert (storage.root / "a/b/kept.dcm").read_bytes() == b"indexed"
    assert not (storage.root / "a/b/fresh.dcm").exists()  # undone: all or nothing
    assert first.exists() and second.exists()
    storage.commit_new([(first, "a/c/fresh.dcm")])  # a new folder, made and synced
    assert (storage.root / "a/c/fresh.dcm").read_bytes() == b"new one"
    assert first.exists()  # a second name: removing the staged one is the caller's


def test_commit_new_on_a_filesystem_without_hard_links(tmp_path: Path) -> None:
    """exFAT (and vfat, some SMB and FUSE mounts) answer link(2) with EPERM: every instance
    above ``listener.spool_max_bytes`` was refused with 0xA700 there. commit_new now renames
    into a name nobody holds, with the same guarantees: a file that is there stays (KeyTaken),
    and a failed batch puts back what it moved."""
    with mounted_exfat(tmp_path) as mountpoint:
        storage = FileStorage(mountpoint / "s")
        storage.put("a/b/kept.dcm", b"indexed")
        first, second = _stage(storage, b"new one"), _stage(storage, b"other")
        for writer in _writers[-2:]:
            writer.close()  # type: ignore[attr-defined]  # (so that the filesystem unmounts at once)
        with pytest.raises(OSError):
            os.link(first, storage.root / "probe")  # really no hard links here
        for path in (first, second):
            storage.sync_staged(path)
        with pytest.raises(KeyTaken, match=r"a/b/kept\.dcm is there already"):
            storage.commit_new([(first, "a/b/fresh.dcm"), (second, "a/b/kept.dcm")])
        assert (storage.root / "a/b/kept.dcm").read_bytes() == b"indexed"
        assert not (storage.root / "a/b/fresh.dcm").exists()  # undone: moved back
        assert first.read_bytes() == b"new one" and second.exists()
        storage.commit_new([(first, "a/c/fresh.dcm")])
        assert (storage.root / "a/c/fresh.dcm").read_bytes() == b"new one"
        assert not first.exists()  # renamed, not linked


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux's")
def test_without_hard_links_a_file_that_appears_after_the_check_is_not_replaced(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without hard links, commit_new checked that the name was free, then renamed: a file put
    there in between (another writer of the same key and nonce) was replaced. The rename now
    refuses to replace in the same step (renameat2, RENAME_NOREPLACE) where the filesystem can;
    here link(2) answers EPERM as on exFAT, and the check is made to miss the file."""
    storage = FileStorage(tmp_path / "s")
    storage.put("a/b/kept.dcm", b"indexed")
    staged = _stage(storage, b"new one")
    storage.sync_staged(staged)

    def no_link(src: object, dst: object, **kwargs: object) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_link)
    monkeypatch.setattr(os.path, "lexists", lambda path: False)  # the file appears after the check
    with pytest.raises(KeyTaken, match=r"a/b/kept\.dcm is there already"):
        storage.commit_new([(staged, "a/b/kept.dcm")])
    assert (storage.root / "a/b/kept.dcm").read_bytes() == b"indexed"
    assert staged.read_bytes() == b"new one"
    storage.commit_new([(staged, "a/b/fresh.dcm")])
    assert (storage.root / "a/b/fresh.dcm").read_bytes() == b"new one"
    assert not staged.exists()  # renamed, not linked


@pytest.mark.parametrize("refusal", [errno.EINVAL, errno.ENOSYS, errno.EPERM])
def test_where_renameat2_is_refused_the_rename_still_replaces_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refusal: int) -> None:
    """renameat2 refused (EINVAL: a FUSE daemon on libfuse 2; ENOSYS: an old kernel; EPERM: a
    container's seccomp filter): the name is checked, then the file renamed, as before it."""
    storage = FileStorage(tmp_path / "s")
    storage.put("a/b/kept.dcm", b"indexed")
    staged = _stage(storage, b"new one")
    storage.sync_staged(staged)
    calls: list[int] = []

    def refused(*args: object) -> int:
        calls.append(1)
        ctypes.set_errno(refusal)
        return -1

    def no_link(src: object, dst: object, **kwargs: object) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_link)
    monkeypatch.setattr(local, "_renameat2", refused)
    with pytest.raises(KeyTaken, match=r"a/b/kept\.dcm is there already"):
        storage.commit_new([(staged, "a/b/kept.dcm")])
    assert (storage.root / "a/b/kept.dcm").read_bytes() == b"indexed"
    storage.commit_new([(staged, "a/b/fresh.dcm")])
    assert (storage.root / "a/b/fresh.dcm").read_bytes() == b"new one"
    assert calls == [1, 1]


def test_settle_fsyncs_each_file_on_fuse_where_syncfs_does_not_reach_the_daemon(tmp_path: Path) -> None:
    """settle made a batch of journaled instances' files durable with one syncfs, and their
    journal records were then done. On FUSE the kernel hands syncfs to the daemon (FUSE_SYNCFS),
    exfat-fuse (libfuse 2) answers ENOSYS, and syncfs returns 0: the files were never flushed to
    the device. There settle now fsyncs each file and folder, and the daemon sees each fsync."""
    log = tmp_path / "fuse.log"
    with mounted_exfat(tmp_path, log=log) as mountpoint:
        storage = FileStorage(mountpoint / "s")
        assert not storage.syncs_whole_filesystem
        assert FileStorage(tmp_path / "local").syncs_whole_filesystem is sys.platform.startswith("linux")
        entries: list[tuple[Path | bytes, str]] = [(b"one", "a/1.dcm"), (b"two", "a/2.dcm")]
        storage.write_unsynced([(b"one", "a/1.dcm"), (b"two", "a/2.dcm")])
        before = len(log.read_bytes())
        storage.settle(entries)
        deadline = time.monotonic() + 5
        while (seen := log.read_bytes()[before:].decode(errors="replace")).count("opcode: FSYNC (20)") < 2:
            assert time.monotonic() < deadline, f"the files' fsyncs did not reach the daemon: {seen[-2000:]}"
            time.sleep(0.05)
        assert "opcode: FSYNCDIR" in seen  # and their folders'


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks")
def test_a_child_forked_while_a_helper_holds_a_lock_can_still_stage(tmp_path: Path) -> None:
    """``taqrir listen`` forks its receiving processes after crash recovery, which may have
    started the storage's helper threads; a lock one of them held at the fork stayed held in the
    child for ever, and every C-STORE there hung taking a staging file."""
    import select
    import signal
    import threading

    storage = FileStorage(tmp_path / "s")
    storage.staging_file().close()  # the spare-making helper runs
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with storage._spares._lock:
            held.set()
            release.wait(10)

    threading.Thread(target=hold, daemon=True).start()
    assert held.wait(5)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            writer = storage.staging_file()
            writer.write(b"x")
            writer.close()
            os.write(w, b"1")
        finally:
            os._exit(0)
    release.set()
    os.close(w)
    try:
        ready = select.select([r], [], [], 5)[0]
        staged = bool(ready) and os.read(r, 1) == b"1"
    finally:
        os.close(r)
        if not staged:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert staged, "the child hung on a lock its parent's helper held at the fork"


def test_a_file_placed_into_a_folder_another_made_syncs_the_entries_leading_to_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two associations (or processes) place the first files of a new series at once: one makes
    the series folder, the other's rename then succeeds at once. That one synced only the series
    folder, so it could answer before the folders holding the new folder's entry were synced (on
    ext4 without a journal each folder's block is written only when it is fsynced)."""
    import storage.local as local

    synced: list[str] = []
    real = local._FolderSyncs.sync

    def sync(self: object, folder: str) -> None:
        synced.append(os.path.relpath(folder, tmp_path / "s"))
        real(self, folder)  # type: ignore[arg-type]

    monkeypatch.setattr(local._FolderSyncs, "sync", sync)
    maker, other = FileStorage(tmp_path / "s"), FileStorage(tmp_path / "s")
    for storage in (maker, other):
        path = _stage(storage, b"x")
        storage.sync_staged(path)
        synced.clear()
        storage.commit_new([(path, f"study/series/{id(storage)}.dcm")])
        assert synced == ["study/series", "study", "."], synced
    path = _stage(other, b"y")
    other.sync_staged(path)
    synced.clear()
    other.commit_new([(path, "study/series/third.dcm")])
    assert synced == ["study/series"]  # once known durable, only the folder itself
