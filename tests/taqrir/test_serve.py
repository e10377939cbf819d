"""``taqrir serve`` as a service manager stops it: SIGTERM must end every process it started
(item 27). A real process tree, a real Redis broker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import redis

from tests.conftest import free_port
from tests.factories.dcmtk import echoscu

REPO = Path(__file__).resolve().parents[2]
REDIS_DB = 11


def _broker_clients(client: redis.Redis) -> list[dict[str, object]]:
    return [c for c in client.client_list() if int(c.get("db", -1)) == REDIS_DB and c.get("cmd") != "client|list"]


@pytest.mark.redis
@pytest.mark.slow
def test_sigterm_stops_every_child_and_their_broker_connections(tmp_path: Path) -> None:
    client = redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB)
    client.ping()
    dicom, api = free_port(), free_port()
    env = {**os.environ, "TAQRIR_DATA_DIR": str(tmp_path / "d"), "TAQRIR_LOG_LEVEL": "WARNING",
           "TAQRIR_QUEUE__BROKER_URL": f"redis://127.0.0.1:6379/{REDIS_DB}", "TAQRIR_QUEUE__SHUTDOWN_GRACE_S": "20"}
    subprocess.run([sys.executable, "-m", "taqrir", "db", "upgrade"], env=env, cwd=REPO, check=True, capture_output=True)
    serve = subprocess.Popen([sys.executable, "-m", "taqrir", "serve", "--workers", "2", "--dicom-host", "127.0.0.1",
                              "--dicom-port", str(dicom), "--api-host", "127.0.0.1", "--api-port", str(api)],
                             env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tree: list[psutil.Process] = []
    try:
        parent = psutil.Process(serve.pid)
        deadline = time.monotonic() + 120
        while True:  # up: the listener answers, two workers with their pool children hold broker connections
            assert serve.poll() is None, serve.stdout.read() if serve.stdout else ""
            assert time.monotonic() < deadline, "serve never came up"
            tree = parent.children(recursive=True)
            workers = [p for p in tree if "worker" in " ".join(p.cmdline())]
            if len(workers) >= 2 and len(tree) >= 4 and len(_broker_clients(client)) >= 2 \
                    and echoscu(dicom).returncode == 0:
                break
            time.sleep(1)
        pids = {p.pid for p in tree}
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=60) == 0
        alive = [p.pid for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert alive == [], f"children still running after SIGTERM: {alive} of {sorted(pids)}"
        deadline = time.monotonic() + 10
        while _broker_clients(client) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _broker_clients(client) == []
        assert echoscu(dicom).returncode != 0  # the listener is gone too
    finally:
        for p in [*tree, psutil.Process(serve.pid)] if serve.poll() is None else tree:
            try:
                p.kill()
            except psutil.Error:
                pass
        serve.wait(timeout=10)
