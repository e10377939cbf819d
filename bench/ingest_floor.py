"""Where the ingest rate's ceiling is: the receive engine with handlers that do less than Taqrir.

    .venv/bin/python bench/ingest_floor.py [--slices 300] [--runs 3]

Same study and sender as ``bench/ingest.py`` (storescu, one association, TCP_NODELAY), in the same
run as DCMTK storescp. Each row is Taqrir's network engine (``integrations.dicom.scp.StorageScp``)
with a handler that does a prefix of what ``taqrir listen`` does per instance:

- ``receive``: write the staging file, answer Success (about what storescp does);
- ``+ fsync``: and fsync it;
- ``+ rename``: and rename it into place and fsync the directory;
- ``+ commit``: and commit one row in SQLite (WAL, ``synchronous=FULL``), so three disk flushes;
- ``taqrir listen``: the real listener (hash, header parse, index and audit rows in that commit).

The gap between ``receive`` and storescp is the network engine's own cost; the next three rows are
the price of durability, which no amount of CPU work removes; the last row's gap to ``+ commit`` is
what Taqrir's own work (hashing, parsing, indexing, auditing) adds.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from receivers import run_floor, run_storescp, run_taqrir

from storage import FileStorage

STEPS = ("receive", "fsync", "rename", "commit")


class _FloorHandler:
    """An ScpHandler doing the first ``depth`` steps of STEPS per instance (thread-safe: parallel
    associations each commit on a connection of their own, as SQLite serialises writers)."""

    def __init__(self, out: Path, depth: int) -> None:
        self.out = out
        # staged as Taqrir stages (storage.FileStorage: empty files made ahead of time, renamed
        # into a staging folder), so that the floor is the flushes, not the file creations
        self.staging = FileStorage(out / "staging")
        self.depth = depth
        self._numbers = itertools.count(1)
        self._local = threading.local()
        if depth >= 4:
            self._connect().execute("CREATE TABLE IF NOT EXISTS i (uid TEXT PRIMARY KEY, path TEXT)")

    def _connect(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.out / "floor.db", isolation_level=None, timeout=60)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            self._local.db = db
        return db

    def refuse_associations(self) -> bool:
        return False

    def staging_file(self) -> Any:
        return self.staging.staging_file()

    def store(self, calling_ae: str, sop_class_uid: str, sop_instance_uid: str, staged: Path) -> tuple[int, str]:
        if self.depth >= 2:
            fd = os.open(staged, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        if self.depth >= 3:
            dst = self.out / f"{os.getpid()}-{next(self._numbers)}.dcm"
            os.replace(staged, dst)
            dfd = os.open(self.out, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
            if self.depth >= 4:
                db = self._connect()
                db.execute("BEGIN IMMEDIATE")
                db.execute("INSERT OR REPLACE INTO i VALUES (?, ?)", (sop_instance_uid, str(dst)))
                db.execute("COMMIT")
        return 0x0000, ""

    def association_event(self, *args: Any, **kwargs: Any) -> None:
        return None

    def refused_host(self, host: str) -> None:
        return None

    def refused_command(self, *args: Any) -> None:
        return None

    def commitment_report(self, *args: Any) -> tuple[int, str]:
        return 0x0211, "not supported"

    def release(self) -> None:
        return None


def serve(out: Path, depth: int, port: int) -> None:
    """Serve as ``taqrir listen`` does by default: one receiving process per core (at most four),
    pre-forked on one listening socket and sharing associations evenly. (Served by one process,
    the floor was bound by its GIL at four associations, not by the disk.)"""
    from integrations.dicom.config import receiving_processes
    from integrations.dicom.receivers import die_with_parent
    from integrations.dicom.scp import ScpConfig, StorageScp
    from integrations.dicom.shares import Shares

    config = ScpConfig(max_pdu=131072, network_timeout=30, acse_timeout=15, dimse_timeout=60, max_associations=4)
    server = StorageScp(config, _FloorHandler(out, depth), ("127.0.0.1", port))
    processes = receiving_processes(None)
    if processes > 1:
        server.share(Shares(processes))
        for index in range(1, processes):
            if os.fork() == 0:
                die_with_parent()
                assert server.shares is not None
                server.shares.become(index)
                try:
                    server.serve_forever()
                finally:
                    os._exit(0)
    server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve is not None:
        serve(args.out, args.serve, args.port)
        return

    from tests.factories.studies import make_ct_series

    src = Path(tempfile.mkdtemp(prefix="taqrir-floor-src-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    work = Path(tempfile.mkdtemp(prefix="taqrir-floor-out-", dir=str(Path.cwd())))  # as bench/ingest.py
    try:
        files = make_ct_series(src, args.slices)
        receivers: dict[str, Any] = {"DCMTK storescp": lambda o: run_storescp(files, o, 1)}
        for depth, step in enumerate(STEPS, start=1):
            label = "receive" if depth == 1 else f"+ {step}"
            receivers[f"engine: {label}"] = lambda o, d=depth: run_floor(files, o, 1, depth=d)
        receivers["taqrir listen"] = lambda o: run_taqrir(files, o, 1, None)
        times: dict[str, list[float]] = {name: [] for name in receivers}
        for i in range(args.runs):
            for n, (name, run) in enumerate(receivers.items()):
                out = work / f"r{n}-{i}"
                times[name].append(run(out).seconds)
                shutil.rmtree(out, ignore_errors=True)
        base = len(files) / statistics.median(times["DCMTK storescp"])
        print(f"{len(files)} instances, 1 association, median of {args.runs}:")
        print(f"{'receiver':30} {'inst/s':>7} {'ms/inst':>8} {'/storescp':>10}")
        for name, ts in times.items():
            rate = len(files) / statistics.median(ts)
            print(f"{name:30} {rate:7.0f} {1000 / rate:8.2f} {rate / base:10.2f}")
    finally:
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
