"""Ship the audit trail to an ATNA collector: RFC 5424 over TLS (RFC 5425), with a durable cursor.

The cursor (:class:`AtnaCursor`, one row per collector ``host:port``) holds the ``seq`` of the last
record the collector is known to have. A batch (``atna.batch`` records after the cursor, in chain
order) is framed (:mod:`audit.atna`), written to the TLS connection, and the cursor moves past it
only when

1. the collector's TCP stack has acknowledged every byte (the socket's unacknowledged send queue,
   ``SIOCOUTQ``, is empty: TLS records ride on TCP, so this covers the TLS stream), and then
2. the connection is still open ``atna.settle_s`` later (no FIN, reset or TLS alert): a collector
   that closes with data it never read resets the connection, and a collector that rejects our
   client certificate after a TLS 1.3 handshake says so with an alert.

Otherwise the connection is dropped and the batch is sent again on the next one.

What that guarantees, honestly. *Nothing is lost* while the collector is down or refusing: the
cursor only moves past acknowledged records, and records are read back from the chain, which is
durable. Records are shipped in ``seq`` order, and ``seq`` is assigned under the chain lock, so no
record becomes visible behind the cursor. *Duplicates* are possible but bounded: when a connection
fails after the collector read part of a batch but before the cursor moved (an ACK lost with the
connection, a collector crash between reading and our check, this process killed between the ACK
and the commit), the next connection re-sends that batch, so at most ``atna.batch`` records per
failure arrive twice. Each message carries its ``seq`` and chain hash in the structured data
(``[taqrir@32473 seq=".." hash=".."]``), an idempotency key by which a collector or an auditor's
query keeps one copy. RFC 5425 has no application-level acknowledgement, so one loss window
remains outside our reach: a collector that acknowledged bytes at TCP level, then lost them
itself without resetting the connection (a crash of its host after the ACK, before it wrote them);
collectors that must close it use RELP or a disk queue.

A permanent TLS failure (the collector's certificate does not verify, or it rejects ours) is
logged as an error, written to the cursor row (``last_error``) and appended once to the audit
chain itself (``atna.tls_failure``: DICOM 110113 Security Alert / 110126 Node Authentication);
retries continue with the same capped backoff, so a fixed certificate resumes shipping by itself.
Transient failures (refused, reset, timeout) retry with doubling waits from ``atna.retry_min_s``
up to ``atna.retry_max_s``. When caught up the sender sleeps ``atna.poll_s`` between looks: no
busy loop.
"""

from __future__ import annotations

import fcntl
import logging
import random
import select as io_select
import socket
import ssl
import struct
import sys
import termios
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Final

from sqlalchemy import Table, select, update
from sqlalchemy.engine import Engine
from sqlmodel import Field, SQLModel

from ground.clock import utcnow
from ground.db import session_scope
from ground.errors import TaqrirError

from .atna import AtnaSource, frame, syslog_message
from .chain import AuditRecord, record
from .config import AtnaSettings

log = logging.getLogger(__name__)

_SIOCOUTQ: Final = getattr(termios, "TIOCOUTQ", 0x5411)  # Linux: SIOCOUTQ == TIOCOUTQ


class AtnaCursor(SQLModel, table=True):
    """How far each collector has the audit trail."""

    __tablename__ = "atna_cursor"

    collector: str = Field(primary_key=True, max_length=300, description="host:port of the collector.")
    last_seq: int = Field(default=0, description="seq of the last record the collector acknowledged.")
    updated_at: datetime = Field(description="When last_seq last moved.")
    failures: int = Field(default=0, description="Consecutive failed attempts (0 when healthy).")
    last_error: str = Field(default="", max_length=1000, description="The last failure, empty when healthy.")
    error_at: datetime | None = Field(default=None, description="When last_error was recorded.")


class ShipError(TaqrirError):
    """Shipping to the collector failed (the batch stays behind the cursor)."""

    permanent = False


class CollectorUnavailable(ShipError):
    """The collector cannot be reached now, or the connection broke (retried with backoff)."""


class TlsRejected(ShipError):
    """TLS failed in a way that retrying cannot fix: fix the certificate, CA or key settings."""

    permanent = True


def read_cursor(engine: Engine, collector: str) -> int:
    """The last acknowledged seq for ``collector`` (a row is created at 0)."""
    with session_scope(engine) as s:
        row = s.get(AtnaCursor, collector)
        if row is None:
            s.add(AtnaCursor(collector=collector, last_seq=0, updated_at=utcnow()))
            return 0
        return row.last_seq


def commit_cursor(engine: Engine, collector: str, *, expected: int, new: int) -> bool:
    """Move the cursor from ``expected`` to ``new`` (compare-and-set: False when another sender
    moved it meanwhile)."""
    with session_scope(engine) as s:
        t: Table = AtnaCursor.__table__  # type: ignore[attr-defined]
        res = s.connection().execute(
            update(t).where(t.c.collector == collector, t.c.last_seq == expected)
            .values(last_seq=new, updated_at=utcnow(), failures=0, last_error="", error_at=None))
        return bool(res.rowcount)


def note_failure(engine: Engine, collector: str, err: ShipError) -> int:
    """Record a failure on the cursor row; a permanent one that differs from the last is also
    appended to the audit chain. Returns the count of consecutive failures."""
    message = str(err)[:1000]
    with session_scope(engine) as s:
        row = s.get(AtnaCursor, collector)
        if row is None:
            row = AtnaCursor(collector=collector, last_seq=0, updated_at=utcnow())
            s.add(row)
        changed = row.last_error != message
        row.failures += 1
        row.last_error = message
        row.error_at = utcnow()
        if err.permanent and changed:
            record(s, action="atna.tls_failure", actor="taqrir", entity_type="Collector", entity_id=collector,
                   outcome="failure", details={"reason": message})
        return row.failures


def pending(engine: Engine, after: int, limit: int) -> list[AuditRecord]:
    """Up to ``limit`` records after seq ``after``, in chain order."""
    t: Table = AuditRecord.__table__  # type: ignore[attr-defined]
    with engine.connect() as conn:
        rows = conn.execute(select(t).where(t.c.seq > after).order_by(t.c.seq).limit(limit)).all()
    return [AuditRecord.model_validate(dict(r._mapping)) for r in rows]


def tls_context(settings: AtnaSettings) -> ssl.SSLContext:
    """A client context that verifies the collector (and presents our certificate when set)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(settings.ca_file) if settings.ca_file else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.cert_file and settings.key_file:
        try:
            ctx.load_cert_chain(str(settings.cert_file), str(settings.key_file))
        except (OSError, ssl.SSLError) as err:
            raise TlsRejected(f"cannot load atna.cert_file/key_file: {err}") from err
    return ctx


_PERMANENT_ALERTS: Final = ("CERTIFICATE", "UNKNOWN_CA", "HANDSHAKE_FAILURE", "PROTOCOL_VERSION", "ACCESS_DENIED",
                            "WRONG_VERSION_NUMBER")


def _classify(err: BaseException, where: str) -> ShipError:
    if isinstance(err, ShipError):
        return err
    if isinstance(err, ssl.SSLCertVerificationError):
        return TlsRejected(f"{where}: the collector's certificate does not verify ({err.verify_message}); "
                           "check atna.ca_file and atna.server_name")
    if isinstance(err, ssl.SSLError) and any(a in (err.reason or "").upper() for a in _PERMANENT_ALERTS):
        return TlsRejected(f"{where}: TLS refused ({err.reason}); check atna.cert_file/key_file against the "
                           "collector's trusted CAs")
    return CollectorUnavailable(f"{where}: {type(err).__name__}: {err}")


class CollectorConnection:
    """One TLS connection to the collector."""

    def __init__(self, settings: AtnaSettings, context: ssl.SSLContext) -> None:
        self.settings = settings
        try:
            raw = socket.create_connection((settings.host, settings.port), timeout=settings.connect_timeout_s)
        except OSError as err:
            raise _classify(err, f"connect to {settings.collector}") from err
        try:
            self.sock = context.wrap_socket(raw, server_hostname=settings.server_name or settings.host)
        except (OSError, ssl.SSLError) as err:
            raw.close()
            raise _classify(err, f"TLS handshake with {settings.collector}") from err
        self.sock.settimeout(settings.ack_timeout_s)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except (OSError, ssl.SSLError) as err:
            raise _classify(err, f"send to {self.settings.collector}") from err

    def unacked(self) -> int:
        """Bytes written but not yet acknowledged by the collector's TCP stack (Linux SIOCOUTQ)."""
        buf = fcntl.ioctl(self.sock.fileno(), _SIOCOUTQ, struct.pack("i", 0))
        return int(struct.unpack("i", buf)[0])

    def wait_acked(self, stop: threading.Event) -> None:
        """Until every byte sent is acknowledged at TCP level (:class:`CollectorUnavailable` after
        ``atna.ack_timeout_s``)."""
        if not sys.platform.startswith("linux"):
            return  # no SIOCOUTQ: the settle check below is all we have
        deadline = time.monotonic() + self.settings.ack_timeout_s
        delay = 0.001
        while self.unacked() > 0:
            if time.monotonic() > deadline:
                raise CollectorUnavailable(f"{self.settings.collector} did not acknowledge a batch within "
                                           f"{self.settings.ack_timeout_s:g} s")
            if stop.wait(delay):
                raise CollectorUnavailable("stopping")
            delay = min(delay * 2, 0.05)

    def check_open(self, wait_s: float) -> None:
        """:class:`ShipError` if the collector closed, reset or alerted within ``wait_s`` seconds."""
        deadline = time.monotonic() + wait_s
        while True:
            left = max(0.0, deadline - time.monotonic())
            readable, _, _ = io_select.select([self.sock], [], [], left) if not self.sock.pending() else ([self.sock], [], [])
            if readable:
                self.sock.setblocking(False)
                try:
                    data = self.sock.recv(4096)
                except ssl.SSLWantReadError:
                    data = None  # a TLS handshake message (e.g. a session ticket): nothing for us
                except (OSError, ssl.SSLError) as err:
                    raise _classify(err, f"{self.settings.collector} closed the connection") from err
                finally:
                    self.sock.setblocking(True)
                    self.sock.settimeout(self.settings.ack_timeout_s)
                if data == b"":
                    raise CollectorUnavailable(f"{self.settings.collector} closed the connection")
                continue
            if time.monotonic() >= deadline:
                return


class AtnaShipper:
    """Sends every chain record after the collector's cursor; one per collector and process."""

    def __init__(self, settings: AtnaSettings, engine: Engine, source: AtnaSource, *,
                 connect: Callable[[], CollectorConnection] | None = None) -> None:
        self.settings = settings
        self.engine = engine
        self.source = source
        self._context: ssl.SSLContext | None = None
        self._connect = connect or self._open
        self._conn: CollectorConnection | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.sent = 0

    def _open(self) -> CollectorConnection:
        if self._context is None:
            self._context = tls_context(self.settings)
        conn = CollectorConnection(self.settings, self._context)
        try:
            conn.check_open(self.settings.settle_s)  # a TLS 1.3 server refusing our certificate says so now
        except CollectorUnavailable as err:
            conn.close()
            # Before we sent a byte: that is the collector refusing the session (rsyslog closes
            # without an alert when it does not trust our certificate).
            raise TlsRejected(f"{self.settings.collector} closed the connection right after the TLS handshake: "
                              "it does not accept this client (check atna.cert_file/key_file against the "
                              "collector's trusted CAs and its permitted peers)") from err
        except ShipError:
            conn.close()
            raise
        return conn

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def ship_batch(self) -> int:
        """Send one batch after the cursor and commit it; 0 when caught up. Raises :class:`ShipError`."""
        collector = self.settings.collector
        cursor = read_cursor(self.engine, collector)
        records = pending(self.engine, cursor, self.settings.batch)
        if not records:
            return 0
        if self._conn is not None:
            try:
                self._conn.check_open(0)  # an idle connection the collector closed meanwhile
            except ShipError:
                self._drop()
        if self._conn is None:
            self._conn = self._connect()
        conn = self._conn
        try:
            conn.send(b"".join(frame(syslog_message(r, self.source)) for r in records))
            conn.wait_acked(self._stop)
            conn.check_open(self.settings.settle_s)
        except ShipError:
            self._drop()
            raise
        if not commit_cursor(self.engine, collector, expected=cursor, new=records[-1].seq):
            log.warning("ATNA cursor for %s moved under us (another sender?): records %d-%d may arrive twice",
                        collector, records[0].seq, records[-1].seq)
        self.sent += len(records)
        return len(records)

    def ship_all(self) -> int:
        """Send until caught up (``taqrir audit-ship --once``). Raises :class:`ShipError`."""
        total = 0
        try:
            while not self._stop.is_set():
                n = self.ship_batch()
                if n == 0:
                    break
                total += n
        finally:
            self._drop()
        return total

    def backoff(self, failures: int) -> float:
        base = min(self.settings.retry_max_s, self.settings.retry_min_s * 2 ** max(0, failures - 1))
        return float(base * random.uniform(0.8, 1.0))

    def run(self) -> None:
        """Ship until :meth:`stop`: catch up, sleep ``poll_s``, retry failures with capped backoff."""
        collector = self.settings.collector
        while not self._stop.is_set():
            try:
                n = self.ship_batch()
            except ShipError as err:
                failures = note_failure(self.engine, collector, err)
                wait = self.backoff(failures)
                if err.permanent:
                    log.error("ATNA shipping to %s refused by TLS (fix the certificates; next try in %.0f s): %s",
                              collector, wait, err)
                else:
                    log.warning("ATNA shipping to %s failed (%d in a row, next try in %.1f s): %s",
                                collector, failures, wait, err)
                self._stop.wait(wait)
                continue
            except Exception:  # a database hiccup must not end the sender
                log.exception("ATNA shipping to %s failed unexpectedly", collector)
                self._drop()
                self._stop.wait(self.settings.retry_min_s)
                continue
            if n == 0:
                self._stop.wait(self.settings.poll_s)
        self._drop()

    def start(self) -> None:
        """Run in a daemon thread (``taqrir listen``/``serve``)."""
        self._thread = threading.Thread(target=self.run, name="atna-shipper", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
