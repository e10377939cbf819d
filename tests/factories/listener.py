"""``taqrir listen`` (or a script standing in for it) as a separate process, for crash tests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from tests.factories.dcmtk import echoscu


def listener_env(data_dir: Path, db_url: str, **settings: str) -> dict[str, str]:
    """The environment of a listener on 127.0.0.1 storing under ``data_dir``; ``settings`` are
    listener settings by field name (``spool_max_bytes="0"``)."""
    return {**os.environ, "TAQRIR_DATA_DIR": str(data_dir), "TAQRIR_DATABASE_URL": db_url,
            "TAQRIR_LISTENER__MIN_FREE_BYTES": "0", "TAQRIR_LISTENER__HOST": "127.0.0.1",
            **{f"TAQRIR_LISTENER__{name.upper()}": value for name, value in settings.items()}}


def start_process(args: list[str], port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Run ``python *args port`` and wait until it answers C-ECHO (30 s at most)."""
    proc = subprocess.Popen([sys.executable, *args, str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while echoscu(port).returncode != 0:
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("listener did not start")
        time.sleep(0.3)
    return proc


def children(pid: int) -> list[int]:
    """The processes ``pid`` forked, from /proc (Linux)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def supervisor(pid: int) -> int | None:
    """The receiving processes' supervisor of the ``taqrir listen`` running as ``pid``
    (integrations.dicom.receivers), or None before it is forked."""
    named = [c for c in children(pid) if Path(f"/proc/{c}/comm").read_text().strip() == "taqrir-sup"]
    return named[0] if named else None


def receivers(pid: int) -> list[int]:
    """The pre-forked receiving processes of the ``taqrir listen`` running as ``pid`` (they are
    its supervisor's children), in the order of their index."""
    sup = supervisor(pid)
    if sup is None:
        return []
    try:
        return sorted(children(sup), key=lambda c: Path(f"/proc/{c}/comm").read_text())
    except FileNotFoundError:  # one exited while we looked
        return []


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for its parent or init to reap it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"
