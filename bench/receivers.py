"""The receivers the ingest benchmarks run side by side, each as a process of its own, and the one
sender (DCMTK ``storescu``, ``TCP_NODELAY=1``, PERFORMANCE-NOTES 1).

Every runner sends the same files over ``parallel`` associations and returns a :class:`Run`: the
wall time of the send and the CPU time the receiver's processes spent during it (user + system,
every thread and child process, read from ``/proc`` just before the first and just after the last
association, so start-up and shutdown are left out). Each runner checks that every instance
arrived (files on disk, or rows in Taqrir's index), not only that storescu saw no failure.

Receivers:

- DCMTK ``storescp``: plain files, no fsync (``--fork``, a process per association, when parallel);
- Orthanc (Debian's package): its defaults, which are durable (``SyncStorageArea`` true: each file
  fsynced before the answer; its SQLite index); no plugin, no HTTP server;
- the flush floor: Taqrir's network engine with a handler that only fsyncs the staged file, renames
  it into place, fsyncs the directory and commits one SQLite row (WAL, ``synchronous=FULL``) per
  instance (``bench/ingest_floor.py --serve``), in as many receiving processes as ``taqrir listen``
  runs by default;
- ``taqrir listen`` (from this tree, or from another checkout with ``tree``).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
ENV = {**os.environ, "TCP_NODELAY": "1"}
_TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Run:
    seconds: float
    cpu_seconds: float
    #: CPU seconds the whole machine spent during the transfer (senders, receiver, kernel), of
    #: ``seconds`` times the cores: how close to the machine's ceiling the run was
    machine_cpu_seconds: float = 0.0


def machine_cpu() -> float:
    """CPU seconds all cores have spent busy since boot (``/proc/stat``: all but idle and iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    user, nice, system, _idle, _iowait, irq, softirq = fields
    return (user + nice + system + irq + softirq) / _TICK


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_echo(port: int, called: str, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the receiver for {called} exited with {proc.returncode} before answering")
        if subprocess.run(["echoscu", "-aec", called, "127.0.0.1", str(port)], env=ENV,
                          capture_output=True, check=False).returncode == 0:
            return
        time.sleep(0.2)
    raise RuntimeError(f"receiver on {port} did not answer C-ECHO")


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of ``pid`` and its live descendants, with what their reaped
    children spent (``/proc/<pid>/stat`` utime, stime, cutime, cstime)."""
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2:].split()  # after "pid (comm) "
        stats[int(entry)] = fields
        children.setdefault(int(fields[1]), []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        f = stats.get(p)
        if f is None:
            continue
        total += sum(int(x) for x in f[11:15])  # utime stime cutime cstime
        todo.extend(children.get(p, []))
    return total / _TICK


def send(port: int, called: str, files: list[Path], parallel: int, receiver_pid: int) -> Run:
    chunks = [files[i::parallel] for i in range(parallel)]
    cpu0 = tree_cpu(receiver_pid)
    busy0 = machine_cpu()
    t0 = time.perf_counter()
    procs = [subprocess.Popen(["storescu", "-aec", called, "127.0.0.1", str(port), *map(str, c)], env=ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for c in chunks]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"storescu failed (exit status {p.returncode}): {err.decode()[-500:]}")
    elapsed = time.perf_counter() - t0
    busy = machine_cpu() - busy0
    time.sleep(0.05)  # a forked storescp reaps its last child after the release
    return Run(elapsed, tree_cpu(receiver_pid) - cpu0, busy)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _send_and_stop(proc: subprocess.Popen[bytes], port: int, called: str, files: list[Path], parallel: int) -> Run:
    """Wait for the receiver to answer C-ECHO, send, then stop it."""
    try:
        wait_echo(port, called, proc)
        return send(port, called, files, parallel, proc.pid)
    finally:
        _stop(proc)


def _count_files(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file())


def run_storescp(files: list[Path], out: Path, parallel: int) -> Run:
    port = free_port()
    out.mkdir(parents=True, exist_ok=True)
    args = ["storescp", "-od", str(out), "--fork"] if parallel > 1 else ["storescp", "-od", str(out)]
    proc = subprocess.Popen([*args, str(port)], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = _send_and_stop(proc, port, "ANY-SCP", files, parallel)
    stored = _count_files(out)
    if stored != len(files):
        raise RuntimeError(f"storescp stored {stored} of {len(files)} instances")
    return run


def orthanc_config(out: Path, port: int) -> dict[str, object]:
    """A minimal Orthanc configuration: its defaults (durable storage, SQLite index, 4 DICOM
    threads in 1.10), a DICOM port, no HTTP server and no plugin."""
    return {
        "Name": "taqrir-bench", "StorageDirectory": str(out / "storage"), "IndexDirectory": str(out / "index"),
        "DicomAet": "ORTHANC", "DicomPort": port, "HttpServerEnabled": False, "Plugins": [],
    }


def run_orthanc(files: list[Path], out: Path, parallel: int) -> Run:
    exe = shutil.which("Orthanc")
    if exe is None:
        raise RuntimeError("Orthanc is not installed (Debian package orthanc)")
    port = free_port()
    out.mkdir(parents=True, exist_ok=True)
    config = out / "orthanc.json"
    config.write_text(json.dumps(orthanc_config(out, port)))
    proc = subprocess.Popen([exe, f"--logdir={out}", str(config)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = _send_and_stop(proc, port, "ORTHANC", files, parallel)
    stored = _count_files(out / "storage")
    if stored != len(files):
        raise RuntimeError(f"Orthanc stored {stored} of {len(files)} instances")
    return run


def run_floor(files: list[Path], out: Path, parallel: int, *, depth: int = 4) -> Run:
    """The flush floor: Taqrir's engine doing only the three flushes per instance (``depth`` < 4:
    only the first steps of ``bench/ingest_floor.py``'s STEPS)."""
    port = free_port()
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, str(BENCH / "ingest_floor.py"), "--serve", str(depth), "--port", str(port),
                             "--out", str(out)], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = _send_and_stop(proc, port, "FLOOR", files, parallel)
    stored = sum(1 for p in out.glob("*.dcm"))
    if depth >= 3 and stored != len(files):
        raise RuntimeError(f"the floor receiver stored {stored} of {len(files)} instances")
    return run


def run_taqrir(files: list[Path], data_dir: Path, parallel: int, database_url: str | None, *,
               processes: int | None = None, tree: Path | None = None,
               extra_env: dict[str, str] | None = None) -> Run:
    """``taqrir listen`` (migrated first with ``taqrir db upgrade``); ``processes`` sets
    ``listener.processes`` (None: the tree's default)."""
    port = free_port()
    env = {**ENV, "TAQRIR_DATA_DIR": str(data_dir), "TAQRIR_LISTENER__MIN_FREE_BYTES": "0",
           "TAQRIR_LOG_LEVEL": "WARNING", **(extra_env or {})}
    if processes is not None:
        env["TAQRIR_LISTENER__PROCESSES"] = str(processes)
    if database_url:
        env["TAQRIR_DATABASE_URL"] = database_url
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    cwd = str(tree) if tree is not None else str(REPO)
    # `taqrir listen` refuses a database that is not at the newest schema (migrations run only from
    # `taqrir db upgrade`, which older trees also have)
    migrate = subprocess.run([sys.executable, "-m", "taqrir", "db", "upgrade"], env=env, capture_output=True,
                             text=True, check=False, cwd=cwd)
    if migrate.returncode != 0:
        raise RuntimeError(f"taqrir db upgrade failed: {migrate.stderr[-1000:]}")
    proc = subprocess.Popen([sys.executable, "-m", "taqrir", "listen", "--port", str(port)], env=env, cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = _send_and_stop(proc, port, "TAQRIR", files, parallel)
    check_indexed(database_url or f"sqlite:///{data_dir.resolve() / 'taqrir.db'}", len(files))
    return run


def check_indexed(url: str, expected: int) -> None:
    """Check the receiver indexed every instance, not only that storescu saw no failure."""
    from sqlalchemy import create_engine, text

    eng = create_engine(url)
    try:
        with eng.connect() as conn:
            n = conn.execute(text("SELECT count(*) FROM instance")).scalar_one()
    finally:
        eng.dispose()
    if n != expected:
        raise RuntimeError(f"taqrir indexed {n} of {expected} instances")
