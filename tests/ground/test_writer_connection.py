"""The kept writer connection of the ingest (:class:`ground.db.WriterConnection`): on SQLite its
transactions also hold a ``flock`` beside the database, so that receiving processes wait for each
other in the kernel (woken at once) rather than in SQLite's sleeping busy handler."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from sqlalchemy import text

from ground.db import WriterConnection, make_engine, upgrade

_TRY_LOCK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
except BlockingIOError:
    print("held")
else:
    print("free")
"""


def _lock_state(path: str) -> str:
    return subprocess.run([sys.executable, "-c", _TRY_LOCK, path], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_a_sqlite_writer_transaction_holds_the_flock_until_it_ends(tmp_path: Path) -> None:
    db = tmp_path / "taqrir.db"
    engine = make_engine(f"sqlite:///{db}")
    upgrade(engine)
    writer = WriterConnection(engine)
    lock = f"{db}.writer-lock"
    try:
        cursor = writer.begin()
        assert _lock_state(lock) == "held"
        cursor.execute("SELECT count(*) FROM instance")
        writer.commit()
        assert _lock_state(lock) == "free"
        writer.begin()
        assert _lock_state(lock) == "held"
        writer.rollback()
        assert _lock_state(lock) == "free"
        writer.begin()
        writer.discard()  # after an error: the lock goes with the connection
        assert _lock_state(lock) == "free"
        with engine.connect() as conn:  # other writers are not held up by it
            assert conn.execute(text("SELECT count(*) FROM instance")).scalar_one() == 0
    finally:
        writer.close()
        engine.dispose()


def test_an_in_memory_database_takes_no_flock(tmp_path: Path) -> None:
    engine = make_engine("sqlite://")
    writer = WriterConnection(engine)
    try:
        writer.begin()
        writer.commit()
    finally:
        writer.close()
        engine.dispose()
    assert list(tmp_path.iterdir()) == []
