"""ORU^R01 over MLLP: messages per second into ``taqrir hl7`` against a bare MLLP echo server.

    .venv/bin/python bench/oru_mllp.py [--messages 2000] [--connections 1,4] [--runs 3]
                                       [--database-url URL] [--no-drafts]

Each receiver runs as its own process on loopback; the same client (one thread and one TCP
connection per sender, each sending an ORU^R01 and waiting for its ACK before the next, as MLLP
senders do) sends the same messages to each:

* baseline: an asyncio MLLP server that answers a fixed AA ACK to every frame without reading it
  (the floor: framing, sockets and the client itself);
* ``taqrir hl7``: keeps the raw message, parses it, finds the study by accession number, stores
  the signed report (English and Arabic text) with its audit record, computes the deltas against
  the study's draft (``--no-drafts``: studies without drafts, so no deltas) and ACKs.

The database (SQLite file by default, or ``--database-url`` PostgreSQL) is seeded with as many
drafted studies as messages, each message signs its own study. Prints messages/s (median of
runs) and the ratio to the baseline of the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ACK = (b"MSH|^~\\&|ECHO||RIS|HOSP|20261201120000||ACK^R01^ACK|A1|P|2.5.1\rMSA|AA|X\r")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the baseline server -------------------------------------------------------------------------


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            await reader.readuntil(b"\x1c\x0d")
            writer.write(b"\x0b" + ACK + b"\x1c\x0d")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


def serve_echo(port: int) -> None:
    async def main() -> None:
        server = await asyncio.start_server(_echo, "127.0.0.1", port, limit=4 * 1024 * 1024)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


# -- client --------------------------------------------------------------------------------------


def wait_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"receiver exited with {proc.returncode}: {proc.stderr.read() if proc.stderr else ''!r}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"receiver on {port} did not start")


def send_all(port: int, frames: list[bytes], connections: int) -> tuple[float, dict[bytes, int]]:
    """Send ``frames`` over ``connections`` parallel connections; returns (seconds, ACK codes)."""
    chunks = [frames[i::connections] for i in range(connections)]
    codes: dict[bytes, int] = {}
    lock = threading.Lock()

    def sender(chunk: list[bytes]) -> None:
        local: dict[bytes, int] = {}
        with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for frame in chunk:
                sock.sendall(frame)
                buf = b""
                while not buf.endswith(b"\x1c\x0d"):
                    part = sock.recv(65536)
                    if not part:
                        raise ConnectionError("receiver closed the connection")
                    buf += part
                code = buf.split(b"MSA|", 1)[1][:2]
                local[code] = local.get(code, 0) + 1
        with lock:
            for k, v in local.items():
                codes[k] = codes.get(k, 0) + v

    threads = [threading.Thread(target=sender, args=(c,)) for c in chunks]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, codes


# -- setup ---------------------------------------------------------------------------------------


def seed(url: str, n: int, run: int, drafts: bool) -> None:
    from ground.db import make_engine, session_scope, upgrade
    from tests.factories.signed import add_draft, add_study

    engine = make_engine(url)
    upgrade(engine)
    with session_scope(engine) as s:
        for i in range(n):
            study = add_study(s, study_uid=f"1.2.826.0.1.3680043.8.498.{run}.{i + 1}",
                              accession=f"B{run}-{i:06d}", patient_id=f"P{run}-{i}")
            if drafts:
                add_draft(s, study)
    engine.dispose()


def frames_for(n: int, run: int, tag: str) -> list[bytes]:
    from tests.factories.hl7 import oru

    return [b"\x0b" + oru(control_id=f"{tag}{run}-{i}", accession=f"B{run}-{i:06d}").encode() + b"\x1c\x0d"
            for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--connections", default="1,4", help="comma-separated parallel sender counts")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--database-url", default="", help="PostgreSQL URL (emptied first); default a SQLite file")
    ap.add_argument("--no-drafts", action="store_true", help="studies without drafts (no delta computation)")
    ap.add_argument("--echo-server", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.echo_server:
        serve_echo(args.echo_server)
        return
    conns = [int(c) for c in args.connections.split(",")]
    results: dict[tuple[str, int], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="oru-bench-") as tmp:
        url = args.database_url or f"sqlite:///{tmp}/taqrir.db"
        if args.database_url:
            from tests.factories.db import reset_postgres_schema

            reset_postgres_schema(url)
        env = {**os.environ, "TAQRIR_DATABASE_URL": url, "TAQRIR_DATA_DIR": f"{tmp}/data",
               "TAQRIR_LOG_LEVEL": "WARNING"}
        run_no = 0
        for run in range(args.runs):
            for c in conns:
                run_no += 1
                seed(url, args.messages, run_no, not args.no_drafts)
                for name in ("baseline", "taqrir"):
                    port = free_port()
                    cmd = ([sys.executable, __file__, "--echo-server", str(port)] if name == "baseline" else
                           [sys.executable, "-m", "taqrir", "hl7", "--host", "127.0.0.1", "--port", str(port)])
                    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                    try:
                        wait_port(port, proc)
                        frames = frames_for(args.messages, run_no, name[0])
                        secs, codes = send_all(port, frames, c)
                    finally:
                        proc.terminate()
                        proc.wait(timeout=30)
                    if codes.get(b"AA", 0) != args.messages:
                        raise SystemExit(f"{name}: not every message was accepted: {codes}")
                    rate = args.messages / secs
                    results.setdefault((name, c), []).append(rate)
                    print(f"run {run + 1} connections {c} {name:<9} {rate:8.1f} msg/s", flush=True)
    db = "PostgreSQL" if args.database_url else "SQLite"
    print(f"\n{args.messages} ORU^R01 (EN+AR text) per run, {args.runs} runs, {db}, "
          f"{'no drafts' if args.no_drafts else 'deltas against a draft'}; medians:")
    print(f"{'connections':>11} {'baseline msg/s':>15} {'taqrir msg/s':>13} {'ratio':>6} {'ms/msg (taqrir)':>16}")
    for c in conns:
        base = statistics.median(results[("baseline", c)])
        taq = statistics.median(results[("taqrir", c)])
        print(f"{c:>11} {base:>15.0f} {taq:>13.1f} {taq / base:>6.3f} {1000 * c / taq:>16.2f}")


if __name__ == "__main__":
    main()
