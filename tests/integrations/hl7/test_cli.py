"""`taqrir hl7` as a process: a RIS's MLLP client sends ORU^R01 to it; `--replay` afterwards."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from hl7.client import MLLPClient
from sqlalchemy.engine import Engine
from sqlmodel import select

from audit.signed_report import SignedReport
from ground.db import session_scope
from tests.conftest import free_port
from tests.factories.hl7 import oru
from tests.factories.signed import add_study, seed


def test_taqrir_hl7_receives_and_replays(engine: Engine, db_url: str, tmp_path: Path) -> None:
    seed(engine)
    port = free_port()
    env = {**os.environ, "TAQRIR_DATABASE_URL": db_url, "TAQRIR_DATA_DIR": str(tmp_path / "data")}
    proc = subprocess.Popen([sys.executable, "-m", "taqrir", "hl7", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.stdout else ""
                time.sleep(0.2)
        with MLLPClient("127.0.0.1", port) as client:
            ok = client.send_message(oru(control_id="CLI1"))
            late = client.send_message(oru(control_id="CLI2", accession="LATER"))
        assert b"MSA|AA|CLI1" in ok and b"MSA|AE|CLI2" in late
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    with session_scope(engine) as s:
        add_study(s, study_uid="1.2.3.77", accession="LATER", patient_id="P9")
    replay = subprocess.run([sys.executable, "-m", "taqrir", "hl7", "--replay"], env=env, capture_output=True,
                            text=True, timeout=120, check=False)
    assert replay.returncode == 0 and "replayed: AA 1" in replay.stdout, replay.stdout + replay.stderr
    with session_scope(engine) as s:
        assert {r.source_id for r in s.exec(select(SignedReport)).all()} == {"CLI1", "CLI2"}
