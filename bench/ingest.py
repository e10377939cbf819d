"""Ingest benchmark: ``taqrir listen`` against DCMTK's ``storescp``, same sender, same run.

    .venv/bin/python bench/ingest.py [--slices 300] [--runs 3] [--database-url URL]
                                     [--processes N] [--baseline-tree DIR]

A generated 300-slice CT study (512x512, 16-bit, ~150 MB) is written to /dev/shm (the VM evicts
cached files from ordinary disk within seconds) and sent by DCMTK ``storescu`` over one
association (and, second table, 4 parallel associations) to each receiver. Both receivers write to
disk under the same folder; storescp writes plain files, Taqrir writes durably (fsync + rename) and
indexes each instance with its audit record. ``TCP_NODELAY=1`` for DCMTK (PERFORMANCE-NOTES, 1).
Prints instances/s and MB/s (median of runs) and the ratio Taqrir/storescp.

Further receivers in the same runs (the machine is shared and noisy: compare only within one run):
``--processes N`` (default 2; 1 leaves it out) adds ``taqrir listen`` with ``listener.processes=N``;
``--baseline-tree DIR`` adds ``taqrir listen`` run from another checkout (e.g. a ``git worktree``
of the previous commit), for before/after numbers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.factories.db import reset_postgres_schema
from tests.factories.studies import make_ct_series

ENV = {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_echo(port: int, called: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if subprocess.run(["echoscu", "-aec", called, "127.0.0.1", str(port)], env=ENV,
                          capture_output=True, check=False).returncode == 0:
            return
        time.sleep(0.2)
    raise RuntimeError(f"receiver on {port} did not answer C-ECHO")


def send(port: int, called: str, files: list[Path], parallel: int) -> float:
    chunks = [files[i::parallel] for i in range(parallel)]
    t0 = time.perf_counter()
    procs = [subprocess.Popen(["storescu", "-aec", called, "127.0.0.1", str(port), *map(str, c)], env=ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for c in chunks]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode()[-500:]}")
    return time.perf_counter() - t0


def run_storescp(files: list[Path], out: Path, parallel: int) -> float:
    port = free_port()
    out.mkdir(parents=True, exist_ok=True)
    args = ["storescp", "-od", str(out), "--fork"] if parallel > 1 else ["storescp", "-od", str(out)]
    proc = subprocess.Popen([*args, str(port)], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_echo(port, "ANY-SCP")
        elapsed = send(port, "ANY-SCP", files, parallel)
    finally:
        proc.terminate()
        proc.wait()
    stored = sum(1 for p in out.rglob("*") if p.is_file())
    if stored != len(files):
        raise RuntimeError(f"storescp stored {stored} of {len(files)} instances")
    return elapsed


def run_taqrir(files: list[Path], data_dir: Path, parallel: int, database_url: str | None, *,
               processes: int = 1, tree: Path | None = None) -> float:
    port = free_port()
    env = {**ENV, "TAQRIR_DATA_DIR": str(data_dir), "TAQRIR_LISTENER__MIN_FREE_BYTES": "0",
           "TAQRIR_LOG_LEVEL": "WARNING", "TAQRIR_LISTENER__PROCESSES": str(processes)}
    if database_url:
        env["TAQRIR_DATABASE_URL"] = database_url
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
        env.pop("TAQRIR_LISTENER__PROCESSES")  # an older tree may not know the setting
    # `taqrir listen` refuses a database that is not at the newest schema (migrations run only from
    # `taqrir db upgrade`, which older trees also have)
    migrate = subprocess.run([sys.executable, "-m", "taqrir", "db", "upgrade"], env=env, capture_output=True,
                             text=True, check=False, cwd=str(tree) if tree is not None else None)
    if migrate.returncode != 0:
        raise RuntimeError(f"taqrir db upgrade failed: {migrate.stderr[-1000:]}")
    proc = subprocess.Popen([sys.executable, "-m", "taqrir", "listen", "--port", str(port)], env=env,
                            cwd=str(tree) if tree is not None else None,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_echo(port, "TAQRIR")
        elapsed = send(port, "TAQRIR", files, parallel)
    finally:
        proc.terminate()
        proc.wait()
    check_indexed(database_url or f"sqlite:///{data_dir.resolve() / 'taqrir.db'}", len(files))
    return elapsed


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--database-url", default=None, help="e.g. postgresql+psycopg://postgres@127.0.0.1/bench (reset each run)")
    ap.add_argument("--processes", type=int, default=2, help="also run taqrir with this many receiving processes (1: not)")
    ap.add_argument("--baseline-tree", type=Path, default=None, help="also run taqrir from this checkout")
    args = ap.parse_args()
    receivers: dict[str, Callable[[list[Path], Path, int], float]] = {
        "DCMTK storescp": lambda f, out, par: run_storescp(f, out, par),
        "taqrir listen (durable+index)": lambda f, out, par: run_taqrir(f, out, par, args.database_url),
    }
    if args.processes > 1:
        receivers[f"taqrir, {args.processes} processes"] = lambda f, out, par: run_taqrir(
            f, out, par, args.database_url, processes=args.processes)
    if args.baseline_tree is not None:
        tree = args.baseline_tree.resolve()
        receivers["taqrir baseline tree"] = lambda f, out, par: run_taqrir(f, out, par, args.database_url, tree=tree)
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    src = Path(tempfile.mkdtemp(prefix="taqrir-bench-src-", dir=shm))
    work = Path(tempfile.mkdtemp(prefix="taqrir-bench-out-", dir=str(Path.cwd())))
    try:
        files = make_ct_series(src, args.slices)
        mb = sum(f.stat().st_size for f in files) / 1e6
        print(f"study: {len(files)} slices, {mb:.1f} MB in {src}; receivers write under {work}")
        for parallel in (1, 4):
            times: dict[str, list[float]] = {name: [] for name in receivers}
            for i in range(args.runs):
                for n, (name, run) in enumerate(receivers.items()):
                    if args.database_url and n:
                        reset_postgres_schema(args.database_url)
                    out = work / f"r{n}-{parallel}-{i}"
                    times[name].append(run(files, out, parallel))
                    shutil.rmtree(out, ignore_errors=True)
            print(f"\n{parallel} association(s), median of {args.runs}:")
            print(f"{'receiver':<32}{'inst/s':>8}{'MB/s':>8}{'/storescp':>11}")
            med = {k: statistics.median(v) for k, v in times.items()}
            scp = med["DCMTK storescp"]
            for name, t in med.items():
                label = name + (" --fork" if parallel > 1 and name == "DCMTK storescp" else "")
                print(f"{label:<32}{len(files) / t:>8.0f}{mb / t:>8.1f}{scp / t:>11.2f}")
            print(f"ratio taqrir/storescp: {scp / med['taqrir listen (durable+index)']:.2f}")
    finally:
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
