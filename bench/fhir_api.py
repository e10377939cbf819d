"""Benchmark of the FHIR API: N drafts in PostgreSQL, 50 concurrent clients searching by patient
and reading reports against a real uvicorn server on loopback, time-bounded.

Two server modes in the same run, on the same database: ``model`` (every stored resource is parsed
into fhir.resources models and the Bundle serialised from models) and ``raw`` (the same stored
JSON spliced into the response without FHIR model objects: the baseline). Both authenticate the
bearer token, run the same SQL and write an audit record per request.

    .venv/bin/python bench/fhir_api.py                     # 100,000 drafts, 20 s per mode
    .venv/bin/python bench/fhir_api.py --drafts 20000 --seconds 10
    .venv/bin/python bench/fhir_api.py --keep              # keep the loaded database (name printed)
    .venv/bin/python bench/fhir_api.py --db taqrir_bench_xxxxxxxx --modes raw --rates 250,500
    .venv/bin/python bench/fhir_api.py --baseline-tree ../old-checkout   # its server too, alternating

Besides latency and throughput it reports the CPU milliseconds per request of the server
processes, the PostgreSQL backends and the load generator itself (this process), and the share of
the whole machine each took, plus what everything else on the machine used meanwhile ("other"):
the load generator shares the cores with the server. A run during which other work took over 10%
of the machine is flagged: its latencies measure that contention as much as the server.

Paced runs have no coordinated omission: each client sends on a fixed schedule and a latency
counts from the scheduled time; every request scheduled within the measured window is sent and
counted even when a slow response made it late, and req/s is what was served over the time it
took (a server that falls behind shows under the offered rate). One too slow to work its backlog
off within another window's length leaves requests unsent (column "unsent"; its percentiles are
then lower bounds). ``--fast-path off`` serves every request through FastAPI's routing, for
comparison with the default.

Drafts are made by the real builders once (a study of the corpus) and then varied per draft at
the JSON level (ids, identifiers, subject, dates), indexed with the store's own ``index_of`` and
bulk-loaded with COPY.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import psutil
import psycopg
from sqlalchemy import text

from ground.db import make_engine, upgrade
from integrations.fhir.app import create_app
from integrations.fhir.auth import issue_token
from integrations.fhir.store import _content_hash, dumps, index_of
from reporting.fhir import build_resources
from reporting.fhir.ids import device_id, patient_id
from reporting.fhir.patient import build_patient
from reporting.fhir.timing import instant
from reporting.labels import with_labels
from taqrir.settings import load_settings
from tests.factories.drafts import CT_3SLICE, draft_from_dicom
from workers.dicom_objects import store_verified_sr

ADMIN_URL = os.environ.get("TAQRIR_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def make_app() -> Any:
    """uvicorn factory for the server processes (settings from TAQRIR_* variables)."""
    settings = load_settings()
    return create_app(settings, make_engine(settings.database_url, pool_size=20, max_overflow=20),
                      store_verified_sr=store_verified_sr)


# ---------------------------------------------------------------------------------------------
# data


def _stamp(value: dict[str, Any], version: int, at: datetime) -> str:
    value["meta"] = {"versionId": str(version), "lastUpdated": instant(at), **with_labels(value.get("meta"))}
    return dumps(value)


def _copy_rows(data: dict[str, Any], at: datetime, out: dict[str, io.StringIO], draft_id: str | None) -> None:
    txt = _stamp(data, 1, at)
    ix = index_of(data)
    chash = _content_hash(data)

    def c(v: Any) -> str:
        if v is None:
            return "\\N"
        if isinstance(v, datetime):
            return v.isoformat()
        return str(v).replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")

    rt, rid = data["resourceType"], data["id"]
    out["fhir_resource"].write("\t".join(c(v) for v in (
        rt, rid, 1, at, chash, txt, draft_id, ix.patient_ref, ix.study_uid, ix.status, ix.effective, ix.issued,
        ix.target_ref)) + "\n")
    out["fhir_resource_history"].write("\t".join(c(v) for v in (rt, rid, 1, at, txt)) + "\n")
    for name, system, code in ix.tokens:
        out["fhir_search_token"].write("\t".join(c(v) for v in (rt, rid, name, system, code)) + "\n")


COLUMNS = {
    "fhir_resource": "(resource_type, id, version_id, last_updated, content_hash, json, draft_id, patient_ref, "
                     "study_uid, status, effective, issued, target_ref)",
    "fhir_resource_history": "(resource_type, id, version_id, last_updated, json)",
    "fhir_search_token": "(resource_type, resource_id, name, system, code)",
}


def load(pg_url: str, n: int, patients: int, batch: int = 5000) -> tuple[list[str], list[str], float]:
    """Insert ``n`` drafts over ``patients`` patients; returns (patient ids, report ids, seconds)."""
    base = draft_from_dicom(CT_3SLICE)
    res = build_resources(base)
    tmpl = {k: json.loads(getattr(res, k).model_dump_json()) for k in ("report", "provenance", "imaging_study", "device")}
    tmpl_text = {k: json.dumps(v) for k, v in tmpl.items()}
    at = datetime.now(UTC)
    t0 = time.perf_counter()
    raw = pg_url.replace("postgresql+psycopg://", "postgresql://")
    pids: list[str] = []
    rids: list[str] = []
    with psycopg.connect(raw, autocommit=False) as conn:
        def flush(buf: dict[str, io.StringIO]) -> None:
            with conn.cursor() as cur:
                for table, cols in COLUMNS.items():
                    with cur.copy(f"COPY {table} {cols} FROM STDIN") as cp:
                        cp.write(buf[table].getvalue())
            conn.commit()

        def fresh() -> dict[str, io.StringIO]:
            return {t: io.StringIO() for t in COLUMNS}

        buf = fresh()
        _copy_rows(json.loads(tmpl_text["device"]), at, buf, None)
        for p in range(patients):
            pat = base.study.patient.model_copy(update={"patient_id": f"BENCH{p:06d}"})
            pids.append(patient_id(pat))
            _copy_rows(json.loads(build_patient(pat).model_dump_json()), at, buf, None)
        flush(buf)
        buf = fresh()
        started0 = datetime(2024, 1, 1, 9, 0, tzinfo=UTC)
        for i in range(n):
            uid = f"{base.study.study_instance_uid}.{i}"
            pid = pids[i % patients]
            rid = f"dr-bench-{i:07d}"
            sid = f"is-bench-{i:07d}"
            started = instant(started0 - timedelta(hours=i))
            issued = instant(at - timedelta(seconds=n - i))
            dr = json.loads(tmpl_text["report"])
            dr["id"] = rid
            dr["identifier"] = [
                {"use": "usual", "system": "urn:taqrir:draft", "value": f"bench-{i}"},
                {"use": "secondary", "system": "urn:dicom:uid", "value": f"urn:oid:{uid}"},
                {"use": "secondary", "system": "urn:taqrir:study-version", "value": f"{uid}#1"},
                {**dr["identifier"][-1], "value": f"ACC{i:08d}"},
            ]
            dr["subject"] = {"reference": f"Patient/{pid}"}
            dr["imagingStudy"] = [{"reference": f"ImagingStudy/{sid}"}]
            dr["effectiveDateTime"] = started
            dr["issued"] = issued
            _copy_rows(dr, at, buf, f"bench-{i}")
            st = json.loads(tmpl_text["imaging_study"])
            st["id"], st["subject"], st["started"] = sid, {"reference": f"Patient/{pid}"}, started
            st["identifier"][0]["value"] = f"urn:oid:{uid}"
            _copy_rows(st, at, buf, None)
            pv = json.loads(tmpl_text["provenance"])
            pv["id"] = f"prov-bench-{i:07d}"
            pv["target"] = [{"reference": f"DiagnosticReport/{rid}/_history/1"}]
            pv["entity"][0]["what"]["reference"] = f"ImagingStudy/{sid}"
            pv["recorded"] = pv["occurredDateTime"] = issued
            _copy_rows(pv, at, buf, f"bench-{i}")
            rids.append(rid)
            if (i + 1) % batch == 0:
                flush(buf)
                buf = fresh()
        flush(buf)
        conn.autocommit = True
        conn.execute("ANALYZE")
    assert device_id(base.model) == tmpl["device"]["id"]
    return pids, rids, time.perf_counter() - t0


def existing(db_url: str) -> tuple[list[str], list[str]]:
    """Patient and report ids of a database loaded by :func:`load`."""
    raw = db_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(raw) as conn:
        rids = [r[0] for r in conn.execute("SELECT id FROM fhir_resource WHERE resource_type = 'DiagnosticReport' "
                                           "AND id LIKE 'dr-bench-%' ORDER BY id")]
        pids = [r[0] for r in conn.execute("SELECT id FROM fhir_resource WHERE resource_type = 'Patient' ORDER BY id")]
    return pids, rids


# ---------------------------------------------------------------------------------------------
# load


async def _client(port: int, token: str, pids: list[str], rids: list[str], until: float, warm_until: float,
                  lat: dict[str, list[float]], errors: list[str], seed: int, interval: float) -> None:
    """One client on one keep-alive connection. With ``interval`` > 0 it sends on a fixed schedule
    and latency counts from the scheduled time (no coordinated omission); with 0 it sends back to back."""
    rng = random.Random(seed)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    auth = f"Authorization: Bearer {token}\r\n"
    next_at = time.perf_counter() + rng.random() * interval
    try:
        k = 0
        # Paced: every request scheduled before ``until`` is sent and counted, even when a slow
        # response made it late (stopping on the clock would drop exactly the requests a stall
        # delayed, and flatter the tail); it counts when it was scheduled after the warm-up. A
        # server too slow to work off its backlog within ``hard_stop`` leaves requests unsent:
        # they are counted as such, and the percentiles are then lower bounds.
        hard_stop = until + (until - warm_until)
        while (next_at if interval else time.perf_counter()) < until:
            if interval and time.perf_counter() >= hard_stop:
                while next_at < until:
                    if next_at >= warm_until:
                        errors.append("unsent")
                    next_at += interval
                break
            if interval:
                delay = next_at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            if k % 2 == 0:
                kind, path = "search", f"/fhir/DiagnosticReport?patient={rng.choice(pids)}&_count=10"
            else:
                kind, path = "read", f"/fhir/DiagnosticReport/{rng.choice(rids)}"
            k += 1
            t = next_at if interval else time.perf_counter()
            next_at += interval
            writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Accept: application/fhir+json\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
            end = time.perf_counter()
            if status != 200:
                errors.append(f"{kind} {status}")
            if (t if interval else end) >= warm_until:
                lat[kind].append(end - t)
                lat["_last_end"][0] = max(lat["_last_end"][0], end)
    finally:
        writer.close()


class CpuMeter:
    """CPU seconds used by the server processes, the PostgreSQL backends of the benchmark database
    and this process (the load generator) between :meth:`mark` calls; the rest of the machine is
    whatever else runs on it."""

    def __init__(self, servers: list[psutil.Process], db_name: str) -> None:
        self._servers = servers
        self._db_name = db_name

    def _tracked(self) -> list[tuple[str, psutil.Process]]:
        out = [("server", s) for s in self._servers]
        out += [("server", c) for s in self._servers for c in s.children(recursive=True)]
        for p in psutil.process_iter(["name", "cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if p.info["name"] == "postgres" and (self._db_name in cmd or "walwriter" in cmd or "checkpointer" in cmd):
                out.append(("postgres", p))
        return out

    def snapshot(self) -> tuple[dict[int, tuple[str, float]], float, float, float]:
        """Per-process CPU seconds, this process's CPU seconds, machine busy CPU seconds, wall time."""
        per: dict[int, tuple[str, float]] = {}
        for role, p in self._tracked():
            try:
                t = p.cpu_times()
                per[p.pid] = (role, t.user + t.system)
            except psutil.Error:
                continue
        me = time.process_time()
        sys_t = psutil.cpu_times()
        busy = sum(sys_t) - sys_t.idle - getattr(sys_t, "iowait", 0.0)
        return per, me, busy, time.perf_counter()

    @staticmethod
    def usage(a: tuple[dict[int, tuple[str, float]], float, float, float],
              b: tuple[dict[int, tuple[str, float]], float, float, float]) -> dict[str, float]:
        """CPU seconds per role between two snapshots, with wall seconds and the machine's busy CPU."""
        roles = {"server": 0.0, "postgres": 0.0}
        for pid, (role, after) in b[0].items():
            before = a[0].get(pid, (role, 0.0))[1]
            roles[role] += after - before
        return {**roles, "loadgen": b[1] - a[1], "machine_busy": b[2] - a[2], "wall": b[3] - a[3]}


async def _drive(port: int, token: str, pids: list[str], rids: list[str], clients: int, warmup: float,
                 seconds: float, rate: float, meter: CpuMeter | None = None
                 ) -> tuple[dict[str, list[float]], list[str], float, dict[str, float]]:
    lat: dict[str, list[float]] = {"search": [], "read": [], "_last_end": [0.0]}
    errors: list[str] = []
    start = time.perf_counter()
    warm_until, until = start + warmup, start + warmup + seconds
    interval = clients / rate if rate else 0.0
    cpu: dict[str, float] = {}

    async def measure() -> None:
        if meter is None:
            return
        await asyncio.sleep(max(0.0, warm_until - time.perf_counter()))
        a = meter.snapshot()
        await asyncio.sleep(max(0.0, until - time.perf_counter()))
        cpu.update(CpuMeter.usage(a, meter.snapshot()))

    await asyncio.gather(measure(), *(_client(port, token, pids, rids, until, warm_until, lat, errors, s, interval)
                                      for s in range(clients)))
    # Throughput over the time it took to serve what was counted: paced requests still queued at
    # the end are served after ``until``, and a server that fell behind shows under the offered rate.
    last_end = lat.pop("_last_end")[0]
    served_in = max(seconds, last_end - warm_until) if rate else seconds
    return lat, errors, served_in, cpu


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1000 if values else float("nan")


def run_mode(mode: str, db_url: str, data_dir: Path, pids: list[str], rids: list[str],
             args: argparse.Namespace, tree: Path = REPO) -> list[dict[str, Any]]:
    """Start a server in ``mode`` and run the paced loads, then saturation, against it. ``tree``:
    the checkout whose server runs (its own ``bench/fhir_api.py:make_app`` and ``.venv``)."""
    from tests.conftest import free_port

    port = free_port()
    env = {**os.environ, "TAQRIR_DATABASE_URL": db_url, "TAQRIR_DATA_DIR": str(data_dir),
           "TAQRIR_API__RESPONSE_MODE": mode, "TAQRIR_API__PORT": str(port),
           "TAQRIR_API__FAST_PATH": "true" if args.fast_path == "on" else "false",
           "TAQRIR_API__BASE_URL": f"http://127.0.0.1:{port}/fhir", "TAQRIR_LOG_LEVEL": "WARNING"}
    settings = load_settings(data_dir=data_dir, database_url=db_url)
    token = issue_token(settings.api, data_dir, "bench", ["user/DiagnosticReport.rs"], ttl_s=3600)
    python = tree / ".venv" / "bin" / "python"
    base_cmd = [str(python) if python.exists() else sys.executable, "-m", "uvicorn", "fhir_api:make_app",
                "--factory", "--app-dir", str(tree / "bench"), "--no-access-log", "--log-level", "warning"]
    run_env = {**env, "PYTHONPATH": str(tree)}
    if tree != REPO:
        mode = f"{mode} base"
    procs: list[subprocess.Popen[bytes]] = []
    socks: list[socket.socket] = []
    if args.listen == "shared":
        # uvicorn --workers: one listening socket shared by the workers; whichever wakes first accepts
        procs.append(subprocess.Popen([*base_cmd, "--host", "127.0.0.1", "--port", str(port), "--workers", str(args.workers)], env=run_env, cwd=tree))
    else:
        # one single-process uvicorn per worker, each on its own SO_REUSEPORT socket: the kernel
        # spreads the connections over them (as gunicorn --reuse-port or nginx reuseport do)
        for _ in range(args.workers):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(("127.0.0.1", port))
            sock.listen(2048)
            socks.append(sock)
            procs.append(subprocess.Popen([*base_cmd, "--fd", str(sock.fileno())], env=run_env, cwd=tree,
                                          pass_fds=[sock.fileno()]))
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                import urllib.request

                urllib.request.urlopen(f"http://127.0.0.1:{port}/fhir/metadata", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                    raise RuntimeError("server did not start") from None
                time.sleep(0.2)
        if socks:
            time.sleep(2)  # every worker is up (the probe reached one of them)
        meter = CpuMeter([psutil.Process(p.pid) for p in procs], db_url.rsplit("/", 1)[1])
        out = []
        for rate in [float(r) for r in args.rates.split(",") if r] + [0.0]:
            lat, errors, seconds, cpu = asyncio.run(_drive(port, token, pids, rids, args.clients, args.warmup,
                                                           args.seconds, rate, meter))
            out.append(_summary(mode, rate, lat, errors, seconds, cpu))
            print(json.dumps(out[-1]), flush=True)
        return out
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
        for sock in socks:
            sock.close()


def _summary(mode: str, rate: float, lat: dict[str, list[float]], errors: list[str], seconds: float,
             cpu: dict[str, float]) -> dict[str, Any]:
    every = lat["search"] + lat["read"]
    n = max(1, len(every))
    ncpu = os.cpu_count() or 1
    wall = cpu.get("wall") or seconds
    return {
        "mode": mode,
        "load": f"paced {rate:.0f}/s" if rate else "saturation",
        "requests": len(every),
        "rps": len(every) / seconds,
        "errors": sum(1 for e in errors if e != "unsent"),
        "unsent": errors.count("unsent"),
        "p50_ms": pct(every, 0.50), "p95_ms": pct(every, 0.95), "p99_ms": pct(every, 0.99),
        "search_p50_ms": pct(lat["search"], 0.5), "search_p99_ms": pct(lat["search"], 0.99),
        "read_p50_ms": pct(lat["read"], 0.5), "read_p99_ms": pct(lat["read"], 0.99),
        "mean_ms": statistics.fmean(every) * 1000 if every else float("nan"),
        # CPU milliseconds per request of each part, and the share of the machine (all cores) it took
        "server_cpu_ms": cpu.get("server", 0.0) * 1000 / n,
        "postgres_cpu_ms": cpu.get("postgres", 0.0) * 1000 / n,
        "loadgen_cpu_ms": cpu.get("loadgen", 0.0) * 1000 / n,
        "server_share": cpu.get("server", 0.0) / (wall * ncpu),
        "postgres_share": cpu.get("postgres", 0.0) / (wall * ncpu),
        "loadgen_share": cpu.get("loadgen", 0.0) / (wall * ncpu),
        "other_share": max(0.0, cpu.get("machine_busy", 0.0) - cpu.get("server", 0.0) - cpu.get("postgres", 0.0)
                           - cpu.get("loadgen", 0.0)) / (wall * ncpu),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--drafts", type=int, default=100_000)
    parser.add_argument("--patients", type=int, default=10_000, help="drafts are spread over this many patients")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2, help="uvicorn worker processes (one per core)")
    parser.add_argument("--listen", choices=("shared", "reuseport"), default="shared",
                        help="shared: uvicorn --workers on one socket; reuseport: one uvicorn per worker, "
                             "each on its own SO_REUSEPORT socket (the kernel balances the connections)")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds per mode")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--rates", default="100,250,500",
                        help="offered loads of the paced runs (req/s over all clients); a saturation run follows")
    parser.add_argument("--modes", default="model,raw")
    parser.add_argument("--fast-path", choices=("on", "off"), default="on",
                        help="api.fast_path: on (the default, as `taqrir api` serves) or off (every request "
                             "through FastAPI's routing, for comparison)")
    parser.add_argument("--keep", action="store_true", help="keep the benchmark database")
    parser.add_argument("--db", help="reuse this database (kept by an earlier --keep run) instead of loading one")
    parser.add_argument("--baseline-tree", type=Path, default=None,
                        help="also serve from this checkout (e.g. a git worktree of the previous commit, with "
                             "its own .venv) on the same database, alternating with this tree: mode 'raw base'")
    args = parser.parse_args()

    admin = make_engine(ADMIN_URL, isolation_level="AUTOCOMMIT", pool_size=1)
    name = args.db or f"taqrir_bench_{uuid.uuid4().hex[:8]}"
    db_url = ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    if not args.db:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        if args.db:
            pids, rids = existing(db_url)
            print(f"reusing {name}: {len(rids)} drafts ({len(pids)} patients)", flush=True)
        else:
            engine = make_engine(db_url, pool_size=1)
            upgrade(engine)
            engine.dispose()
            pids, rids, secs = load(db_url, args.drafts, min(args.patients, args.drafts))
            print(f"loaded {args.drafts} drafts ({len(pids)} patients) into {name} in {secs:.1f} s "
                  f"({args.drafts / secs:.0f} drafts/s)", flush=True)
        results = []
        with tempfile.TemporaryDirectory() as tmp:
            trees = [REPO] + ([args.baseline_tree.resolve()] if args.baseline_tree else [])
            for mode in args.modes.split(","):
                for tree in trees:  # alternating, so that both trees meet the same machine
                    results += run_mode(mode, db_url, Path(tmp), pids, rids, args, tree)
        print(f"\n{'mode':10} {'load':>12} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'search p99':>11} {'read p99':>9} {'errors':>7} {'unsent':>7}")
        for r in results:
            print(f"{r['mode']:10} {r['load']:>12} {r['rps']:8.0f} {r['p50_ms']:8.1f} {r['p95_ms']:8.1f} {r['p99_ms']:8.1f} "
                  f"{r['search_p99_ms']:11.1f} {r['read_p99_ms']:9.1f} {r['errors']:7d} {r['unsent']:7d}")
        print(f"\nCPU ms per request and share of the whole machine ({os.cpu_count()} CPUs):")
        print(f"{'mode':10} {'load':>12} {'server':>8} {'postgres':>9} {'loadgen':>8} | {'server':>7} {'pg':>5} {'loadgen':>7} {'other':>6}")
        for r in results:
            print(f"{r['mode']:10} {r['load']:>12} {r['server_cpu_ms']:8.2f} {r['postgres_cpu_ms']:9.2f} {r['loadgen_cpu_ms']:8.2f} | "
                  f"{r['server_share']:7.0%} {r['postgres_share']:5.0%} {r['loadgen_share']:7.0%} {r['other_share']:6.0%}")
        print(f"\n{args.clients} clients, {args.workers} uvicorn workers ({args.listen} socket, fast path {args.fast_path}), "
              f"{os.cpu_count()} CPUs shared by server, PostgreSQL and the load generator; targets: p99 < 50 ms, >= 500 req/s")
        behind = [f"{r['mode']} {r['load']}" for r in results if r["unsent"]]
        if behind:
            print(f"warning: the server fell so far behind in {', '.join(behind)} that requests were left unsent "
                  "(column 'unsent'): their percentiles are lower bounds")
        busy = [r for r in results if r["other_share"] > 0.10]
        if busy:
            print(f"warning: other work took over 10% of the machine during {len(busy)} run(s) ('other' above): "
                  "their latencies measure that contention too; run again on a quiet machine")
    finally:
        if not args.keep and not args.db:
            with admin.connect() as conn:
                conn.execute(text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"))
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


if __name__ == "__main__":
    main()
