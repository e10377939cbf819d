"""Micro-benchmark of :func:`integrations.dicom.ingest.ingest_file`: the per-instance work after
the bytes are on disk (header parse, free-space check, fsyncs and rename, index transaction with
its audit record, commit), without the network.

    flock /tmp/taqrir-bench.lock .venv/bin/python bench/ingest_index.py \\
        [--slices 300] [--runs 3] [--baseline-tree DIR [--new-tree DIR]] [--pg-admin-url URL | --no-postgres]

A generated CT series (``make_ct_series``: 512x512, 16-bit, ~0.5 MB per slice) is written once to
/dev/shm. Each measurement is a fresh worker process (``--worker``) with a fresh database (a
SQLite file, or an emptied PostgreSQL database of its own) and a fresh storage folder on disk
(under the current directory, so fsyncs are real). For every slice it stages a copy through
``FileStorage.staging_file()`` as the listener's receive does (untimed), then times
``ingest_file`` alone: wall time (everything it waits for included: fsyncs, and the hashing the
storage does when the file is handed over) and the calling thread's CPU time (what code changes
move; fsyncs are the disk's, noisy on a shared VM, and the storage's fsync thread is not counted).

``--baseline-tree DIR`` runs the same worker with ``PYTHONPATH=DIR`` (e.g. a
``git worktree add --detach /tmp/base HEAD``), alternating with this tree (or ``--new-tree``) in
every run, so that before/after numbers come from the same run on the same noisy machine. Compare
only within a run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent


def worker(src: Path, db_url: str, work: Path, profile: Path | None) -> dict[str, Any]:
    """Ingest every file of ``src`` once; return per-instance timings (runs inside ``--worker``)."""
    import pydicom.config

    from ground.db import make_engine, upgrade
    from integrations.dicom.ingest import ingest_file

    try:  # a baseline tree from before the storage room (issue 12)
        from integrations.dicom.storage import LocalStorage as FileStorage  # type: ignore[import-not-found]
    except ImportError:
        from storage import FileStorage

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE  # as the listener sets
    datas = [p.read_bytes() for p in sorted(src.glob("*.dcm"))]
    storage = FileStorage(work / "store")
    engine = make_engine(db_url)
    upgrade(engine)
    wall: list[float] = []
    cpu: list[float] = []
    prof = None
    if profile is not None:
        import cProfile

        prof = cProfile.Profile()
    for data in datas:
        writer = storage.staging_file(delete=False, mode="wb", suffix=".dcm")
        writer.write(data)
        writer.file.flush()
        staged = Path(writer.name)
        c0, t0 = time.thread_time(), time.perf_counter()
        if prof is not None:
            prof.enable()
        ingest_file(engine=engine, storage=storage, staged=staged, calling_ae="BENCH", min_free_bytes=1 << 20)
        if prof is not None:
            prof.disable()
        t1, c1 = time.perf_counter(), time.thread_time()
        writer.close()
        staged.unlink(missing_ok=True)
        wall.append((t1 - t0) * 1e3)
        cpu.append((c1 - c0) * 1e3)
    with engine.connect() as conn:
        from sqlalchemy import text

        n = conn.execute(text("SELECT count(*) FROM instance")).scalar_one()
        seq = conn.execute(text("SELECT max(seq) FROM audit_event")).scalar_one()
    engine.dispose()
    if n != len(datas) or seq != len(datas):
        raise RuntimeError(f"indexed {n} instances and {seq} audit records of {len(datas)}")
    if prof is not None and profile is not None:
        prof.dump_stats(str(profile))
    return {"wall": wall, "cpu": cpu}


def run_worker(tree: Path, src: Path, db_url: str, work: Path, profile: Path | None) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, str(HERE), "--worker", "--tree", str(tree), "--src", str(src),
           "--db", db_url, "--work", str(work)]
    if profile is not None:
        cmd += ["--profile", str(profile)]
    out = subprocess.run(cmd, env=env, cwd=str(tree), capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"worker for {tree} failed:\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def fresh_sqlite(work: Path) -> str:
    return f"sqlite:///{work / 'taqrir.db'}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--baseline-tree", type=Path, default=None, help="also run this checkout (\"old\")")
    ap.add_argument("--new-tree", type=Path, default=REPO, help="the checkout measured as \"new\" (default: this one)")
    ap.add_argument("--pg-admin-url", default=os.environ.get("TAQRIR_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test"))
    ap.add_argument("--no-postgres", action="store_true")
    ap.add_argument("--no-sqlite", action="store_true")
    ap.add_argument("--profile", type=Path, default=None, help="cProfile this tree's last run into DIR")
    # worker mode (internal)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tree", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--src", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--db", help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        sys.path.insert(0, str(args.tree))
        print(json.dumps(worker(args.src, args.db, args.work, args.profile)))
        return

    sys.path.insert(0, str(REPO))
    from sqlalchemy import text

    from ground.db import make_engine
    from tests.factories.db import reset_postgres_schema
    from tests.factories.studies import make_ct_series

    trees = {"new": args.new_tree.resolve()}
    if args.baseline_tree is not None:
        trees = {"old": args.baseline_tree.resolve(), "new": args.new_tree.resolve()}
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    src = Path(tempfile.mkdtemp(prefix="taqrir-bench-ix-src-", dir=shm))
    work_root = Path(tempfile.mkdtemp(prefix="taqrir-bench-ix-", dir=str(Path.cwd())))
    pg_name = f"taqrir_bench_ix_{uuid.uuid4().hex[:8]}"
    admin = None
    dbs = [] if args.no_sqlite else ["sqlite"]
    if not args.no_postgres:
        admin = make_engine(args.pg_admin_url, isolation_level="AUTOCOMMIT", pool_size=1)
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{pg_name}"'))
        dbs.append("postgresql")
    pg_url = args.pg_admin_url.rsplit("/", 1)[0] + f"/{pg_name}"
    results: dict[tuple[str, str], dict[str, list[float]]] = {}
    try:
        files = make_ct_series(src, args.slices)
        mb = sum(f.stat().st_size for f in files) / 1e6
        print(f"series: {len(files)} slices, {mb:.1f} MB; storage and SQLite under {work_root}")
        for run in range(args.runs):
            order = list(trees.items()) if run % 2 == 0 else list(reversed(trees.items()))
            for db in dbs:
                for name, tree in order:
                    work = work_root / f"{name}-{db}-{run}"
                    work.mkdir()
                    if db == "sqlite":
                        url = fresh_sqlite(work)
                    else:
                        reset_postgres_schema(pg_url)
                        url = pg_url
                    profile = None
                    if args.profile is not None and name == "new" and run == args.runs - 1:
                        args.profile.mkdir(parents=True, exist_ok=True)
                        profile = args.profile.resolve() / f"ingest-{db}.prof"
                    r = run_worker(tree, src, url, work, profile)
                    acc = results.setdefault((name, db), {"wall": [], "cpu": [], "run_medians": []})
                    acc["wall"] += r["wall"]
                    acc["cpu"] += r["cpu"]
                    acc["run_medians"].append(statistics.median(r["wall"]))
                    shutil.rmtree(work, ignore_errors=True)
        print(f"\ningest_file, ms per instance ({args.runs} runs x {len(files)} instances, pooled):")
        print(f"{'tree':<6}{'database':<12}{'median':>8}{'mean':>8}{'p90':>8}{'cpu med':>9}{'cpu mean':>9}   run medians")
        for (name, db), acc in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0] != "old")):
            wall, cpu = acc["wall"], acc["cpu"]
            p90 = statistics.quantiles(wall, n=10)[-1]
            runs = " ".join(f"{m:.2f}" for m in acc["run_medians"])
            print(f"{name:<6}{db:<12}{statistics.median(wall):>8.2f}{statistics.mean(wall):>8.2f}{p90:>8.2f}"
                  f"{statistics.median(cpu):>9.2f}{statistics.mean(cpu):>9.2f}   {runs}")
    finally:
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(work_root, ignore_errors=True)
        if admin is not None:
            with admin.connect() as conn:
                conn.execute(text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{pg_name}'"))
                conn.execute(text(f'DROP DATABASE IF EXISTS "{pg_name}"'))
            admin.dispose()


if __name__ == "__main__":
    main()
