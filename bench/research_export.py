"""Benchmark of ``taqrir research export``: N draft versions (default 100,000) in a database,
exported to Parquet + JSON Lines; rows/s and peak memory, against a baseline in the same run.

    .venv/bin/python bench/research_export.py                      # 100k drafts, PostgreSQL
    .venv/bin/python bench/research_export.py --drafts 20000 --db sqlite
    .venv/bin/python bench/research_export.py --batch-rows 500,2000,10000

The database is filled by ``tests/factories/research_bulk.py`` (drafts of five modalities with
bilingual text, stage times, reviews in the audit trail, signed reports for 60% of studies and
their deltas). Each measured run is a fresh Python process (its peak RSS is its own, from
``getrusage``), run one after the other on an otherwise idle database:

* **taqrir**: :func:`audit.research.export.export` as the CLI runs it (batched keyset queries of
  the drafts, their reviews, signed reports and deltas; de-identification; Parquet + JSONL).
* **baseline**: pyarrow writing the same rows without Taqrir's queries: it streams the rows the
  taqrir run wrote (its JSON Lines file, parsed in batches of the same size) into a ParquetWriter
  with the same schema and compression and a JSONL file. What the export costs beyond it is the
  database reads, the row building and the de-identification.
* **baseline-memory**: the same baseline with every row held in memory first (what an export
  that is not streamed would need).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PG_ADMIN = os.environ.get("TAQRIR_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _peak_mb() -> float:
    """This process's peak resident set (VmHWM). Not getrusage's ru_maxrss: Linux carries that
    across exec, so a child started by a big parent reports the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_taqrir(url: str, out: Path, batch_rows: int) -> dict[str, Any]:
    from pydantic import SecretStr

    from audit.research.config import ResearchSettings
    from audit.research.export import ExportFilter, export
    from ground.db import make_engine

    engine = make_engine(url)
    settings = ResearchSettings(pseudonym_key=SecretStr("b" * 40), batch_rows=batch_rows, dates="full")
    start_mb = _peak_mb()
    t0 = time.perf_counter()
    summary = export(engine, settings, out, ExportFilter(), actor="bench")
    seconds = time.perf_counter() - t0
    return {"rows": summary.rows, "seconds": seconds, "peak_mb": _peak_mb(), "start_mb": start_mb}


def child_baseline(source: Path, out: Path, batch_rows: int, *, in_memory: bool) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from audit.research.columns import SCHEMA

    out.mkdir(parents=True, exist_ok=True)
    start_mb = _peak_mb()
    t0 = time.perf_counter()
    n = 0
    with source.open(encoding="utf-8") as src:
        def batches() -> Any:
            batch: list[dict[str, Any]] = []
            for line in src:
                batch.append(json.loads(line))
                if len(batch) == batch_rows:
                    yield batch
                    batch = []
            if batch:
                yield batch

        todo = list(batches()) if in_memory else batches()
        with pq.ParquetWriter(out / "drafts.parquet", SCHEMA, compression="zstd") as writer, \
                (out / "drafts.jsonl").open("w", encoding="utf-8") as jsonl:
            for rows in todo:
                writer.write_batch(pa.RecordBatch.from_pylist(rows, schema=SCHEMA))
                jsonl.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
                n += len(rows)
    seconds = time.perf_counter() - t0
    return {"rows": n, "seconds": seconds, "peak_mb": _peak_mb(), "start_mb": start_mb}


def _run_child(*args: str) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"child {args[0]} failed:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _make_db(kind: str, workdir: Path) -> tuple[str, Any]:
    from sqlalchemy import text

    from ground.db import make_engine

    if kind == "sqlite":
        return f"sqlite:///{workdir / 'bench.db'}", None
    admin = make_engine(PG_ADMIN, isolation_level="AUTOCOMMIT", pool_size=1)
    name = f"taqrir_bench_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"))
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()

    return PG_ADMIN.rsplit("/", 1)[0] + f"/{name}", drop


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--drafts", type=int, default=100_000)
    ap.add_argument("--db", choices=["postgres", "sqlite"], default="postgres")
    ap.add_argument("--batch-rows", default="2000", help="Comma-separated batch sizes to measure.")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "taqrir":
            out = child_taqrir(rest[0], Path(rest[1]), int(rest[2]))
        else:
            out = child_baseline(Path(rest[0]), Path(rest[1]), int(rest[2]), in_memory=kind == "baseline-memory")
        print(json.dumps(out))
        return

    from ground.db import make_engine, upgrade
    from tests.factories.research_bulk import load

    with tempfile.TemporaryDirectory(prefix="taqrir-bench-research-") as tmp:
        work = Path(tmp)
        url, drop = _make_db(args.db, work)
        try:
            engine = make_engine(url)
            upgrade(engine)
            t0 = time.perf_counter()
            n = load(engine, args.drafts)
            engine.dispose()
            print(f"loaded {n} draft versions into {args.db} in {time.perf_counter() - t0:.1f} s", flush=True)
            print(f"{'run':<16} {'batch':>6} {'rows':>8} {'seconds':>8} {'rows/s':>9} {'peak MB':>8} {'start MB':>8}")
            for batch in [int(b) for b in args.batch_rows.split(",")]:
                out = work / f"taqrir-{batch}"
                runs = [("taqrir", _run_child("taqrir", url, str(out), str(batch)))]
                for kind in ("baseline", "baseline-memory"):
                    runs.append((kind, _run_child(kind, str(out / "drafts.jsonl"), str(work / f"{kind}-{batch}"),
                                                  str(batch))))
                for kind, r in runs:
                    print(f"{kind:<16} {batch:>6} {r['rows']:>8} {r['seconds']:>8.2f} {r['rows'] / r['seconds']:>9.0f} "
                          f"{r['peak_mb']:>8.0f} {r['start_mb']:>8.0f}", flush=True)
                sizes = {p.name: p.stat().st_size for p in out.iterdir() if p.is_file()}
                print(f"  files: {json.dumps(sizes)}")
        finally:
            if drop is not None:
                drop()


if __name__ == "__main__":
    main()
