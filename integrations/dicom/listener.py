"""The DICOM Storage SCP (``taqrir listen``): a thin pynetdicom adapter over :mod:`.ingest`.

Choices, with the measurements behind them (shared PERFORMANCE-NOTES and RELIABILITY-NOTES):

- Chunked receive (``STORE_RECV_CHUNKED_DATASET``): pynetdicom writes each dataset straight to a
  temporary file in our storage's ``.incoming`` folder (same filesystem, so committing is an atomic
  rename), never whole in memory: whole-slide images can be gigabytes.
- Unrestricted storage negotiation: every storage SOP class (and private ones) is accepted with the
  first transfer syntax the sender proposes, stored as sent. Listing ~170 SOP classes x ~45 syntaxes
  cost ~57 ms of CPU per association; this costs ~nothing.
- TCP_NODELAY on every accepted socket and a 128 KiB maximum PDU by default.
- Deliberate network/ACSE/DIMSE timeouts and an association limit, so that misbehaving peers free
  their slot; a free-space floor below which associations are refused with A-ASSOCIATE-RJ
  (transient, local limit exceeded) and C-STORE answers 0xA700.
- Handlers return DIMSE statuses and never raise into pynetdicom's threads.
- ``listener.processes`` > 1 pre-forks receiving processes that accept on the same listening
  socket (the kernel hands each connection to one of them). One process is bound by the GIL to
  about one core (four associations in one process were no faster than one); each process runs its
  own associations, handlers and database connections, and the index and audit chain serialise
  writers across processes as they do across threads. The parent also serves and alone runs the
  stability sweeper. A child that is
  killed loses at most unacknowledged transfers, as any crash does; children leave when the
  parent does. Measured on the shared 2-core VM (300-slice CT, 4 associations, SQLite) two
  processes were no faster than one (74 vs 72 instances/s): the senders and other load already
  filled both cores, and every instance's index transaction (statements, rename, directory and
  WAL fsyncs) holds the one index lock, which caps all processes together. Hence the default of 1.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import signal
import socket
import ssl
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, cast

import pydicom.config
from pynetdicom import AE, _config, dimse_messages, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.engine import Engine

from audit.chain import record
from taqrir.db import session_scope
from taqrir.settings import ListenerSettings, StudySettings

from .errors import (
    STATUS_PROCESSING_FAILURE,
    STATUS_SUCCESS,
    DicomInputError,
    OutOfResources,
    StorageFailure,
)
from .ingest import ingest_file, record_rejection
from .stability import Handoff, log_handoff, sweep_stable
from .storage import LocalStorage

log = logging.getLogger(__name__)


def _configure_pynetdicom(storage: LocalStorage) -> None:
    _config.STORE_RECV_CHUNKED_DATASET = True
    _config.UNRESTRICTED_STORAGE_SERVICE = True
    # pynetdicom creates its temporary files with NamedTemporaryFile() in the default temporary
    # directory; pointing its factory (not the process-wide tempfile.tempdir) at storage/.incoming
    # keeps the final rename on one filesystem, and the storage's staging files hash what is
    # written, so the handler does not read the file back to hash it. One storage per process: a
    # second listener with another storage falls back to copying (see
    # Listener._staged_in_storage) and to hashing the copy.
    dimse_messages.NamedTemporaryFile = storage.staging_file  # type: ignore[attr-defined,assignment]  # deliberate monkeypatch
    # Headers of real-world files violate VR rules often; read them, don't warn per element.
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


class _GuardedAE(AE):
    """An AE that refuses new associations while storage is below its free-space floor."""

    def __init__(self, *args: Any, refuse: Callable[[], bool], **kwargs: Any) -> None:
        self._refuse = refuse
        super().__init__(*args, **kwargs)

    @property
    def maximum_associations(self) -> int:
        # pynetdicom rejects (transient, local-limit-exceeded) when active > maximum: 0 refuses all.
        return 0 if self._refuse() else self._maximum_associations

    @maximum_associations.setter
    def maximum_associations(self, value: int) -> None:
        self._maximum_associations = max(int(value), 1)


class _Server(ThreadedAssociationServer):
    """Association server with a host allow-list and TCP_NODELAY on accepted sockets."""

    allowed: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    on_refused_host: Callable[[str], None] = staticmethod(lambda host: None)
    daemon_threads = True

    def server_bind(self) -> None:
        super().server_bind()
        # Never block in accept(): with several processes on one listening socket, all of them
        # wake for a connection and the ones that lose the race must go back to waiting (a
        # blocking accept would hold their serve loop, and their shutdown, until the next one).
        cast(socket.socket, self.socket).setblocking(False)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        sock, address = self.socket.accept()
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        # An accepted socket does not inherit the listening socket's timeout: without one, a peer
        # that sends half a PDU and goes quiet pins an association slot forever (pynetdicom reads
        # the rest of a PDU with a blocking recv). Reads happen only once data is ready, so this
        # bounds stalls inside a PDU, not idle time between messages.
        sock.settimeout(self.ae.network_timeout)
        if self.ssl_context:
            # pynetdicom wraps with the TLS handshake done here, in the one accepting thread: a
            # peer that connects and stays silent would stop every other connection. Defer the
            # handshake to the association's own thread (OpenSSL does it on first read/write).
            sock = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        if not self.allowed:
            return True
        try:
            ip = ipaddress.ip_address(client_address[0])
        except ValueError:
            return False
        if any(ip in net for net in self.allowed):
            return True
        self.on_refused_host(str(ip))
        return False


class Listener:
    """A running Storage SCP plus its stability sweeper."""

    def __init__(
        self,
        *,
        settings: ListenerSettings,
        study_settings: StudySettings,
        engine: Engine,
        storage: LocalStorage,
        handoff: Handoff = log_handoff,
    ) -> None:
        self.settings = settings
        self.study_settings = study_settings
        self.engine = engine
        self.storage = storage
        self.handoff = handoff
        self._server: _Server | None = None
        self._stop = threading.Event()
        self._sweeper: threading.Thread | None = None
        self._children: list[int] = []

    # -- pure-ish decisions -------------------------------------------------------------------
    def storage_low(self) -> bool:
        try:
            return self.storage.free_bytes() < self.settings.min_free_bytes
        except OSError:
            return True

    # -- handlers (return DIMSE statuses, never raise) -----------------------------------------
    def _handle_echo(self, event: evt.Event) -> int:
        return STATUS_SUCCESS

    def _handle_store(self, event: evt.Event) -> int:
        calling_ae = event.assoc.requestor.ae_title
        req = cast(C_STORE, event.request)
        sop_uid = str(req.AffectedSOPInstanceUID or "")
        staged: Path | None = None
        try:
            staged = self._staged_in_storage(event.dataset_path)
            ingest_file(
                engine=self.engine,
                storage=self.storage,
                staged=staged,
                calling_ae=calling_ae,
                announced_sop_instance_uid=sop_uid or None,
                announced_sop_class_uid=str(req.AffectedSOPClassUID or "") or None,
                min_free_bytes=self.settings.min_free_bytes,
                max_sequence_depth=self.settings.max_sequence_depth,
            )
        except (DicomInputError, OutOfResources, StorageFailure) as err:
            log.warning("C-STORE from %s refused with 0x%04X: %s", calling_ae, err.status, err)
            record_rejection(self.engine, calling_ae=calling_ae, sop_instance_uid=sop_uid, err=err, status=err.status)
            return err.status
        except Exception as err:  # noqa: BLE001 - answer the sender, keep serving
            log.exception("C-STORE from %s failed unexpectedly", calling_ae)
            record_rejection(self.engine, calling_ae=calling_ae, sop_instance_uid=sop_uid, err=err,
                             status=STATUS_PROCESSING_FAILURE)
            return STATUS_PROCESSING_FAILURE
        finally:
            if staged is not None and staged != event.dataset_path:
                staged.unlink(missing_ok=True)
        return STATUS_SUCCESS

    def _staged_in_storage(self, path: Path) -> Path:
        """The received file, in our storage's staging folder (copied there only when another
        listener in this process redirected pynetdicom's temporary files elsewhere)."""
        if path.parent == self.storage.tmp_dir:
            return path
        dst = self.storage.tmp_dir / path.name
        shutil.copyfile(path, dst)
        return dst

    def _audit_assoc(self, event: evt.Event, action: str, outcome: str = "success") -> None:
        try:
            requestor = event.assoc.requestor
            with session_scope(self.engine) as session:
                record(session, action=action, actor=requestor.ae_title or "", entity_type="Association",
                       entity_id=f"{requestor.address}:{requestor.port}", outcome=outcome,
                       details={"address": requestor.address, "called_ae": self.settings.ae_title})
        except Exception:  # noqa: BLE001
            log.exception("could not audit %s", action)

    def _audit_refused_host(self, host: str) -> None:
        try:
            with session_scope(self.engine) as session:
                record(session, action="association.refused", actor="", entity_type="Association",
                       entity_id=host, outcome="failure", details={"address": host, "reason": "host not allowed"})
        except Exception:  # noqa: BLE001
            log.exception("could not audit a refused host")

    # -- lifecycle ---------------------------------------------------------------------------
    def _make_ae(self) -> _GuardedAE:
        s = self.settings
        ae = _GuardedAE(ae_title=s.ae_title, refuse=self.storage_low)
        ae.maximum_associations = s.max_associations
        ae.maximum_pdu_size = s.max_pdu
        ae.network_timeout = s.network_timeout
        ae.acse_timeout = s.acse_timeout
        ae.dimse_timeout = s.dimse_timeout
        ae.require_calling_aet = list(s.allowed_calling_aes)
        ae.add_supported_context(Verification)
        return ae

    def _ssl_context(self) -> ssl.SSLContext | None:
        s = self.settings
        if not s.tls_cert:
            return None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(s.tls_cert), str(s.tls_key) if s.tls_key else None)
        if s.tls_ca:
            ctx.load_verify_locations(str(s.tls_ca))
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def start(self) -> int:
        """Start serving in background threads; returns the bound port."""
        _configure_pynetdicom(self.storage)
        discarded = self.storage.discard_staged()
        if discarded:
            log.info("discarded %d partial transfers left by an earlier run", discarded)
        ae = self._make_ae()
        handlers: list[Any] = [
            (evt.EVT_C_ECHO, self._handle_echo),
            (evt.EVT_C_STORE, self._handle_store),
            (evt.EVT_ACCEPTED, lambda e: self._audit_assoc(e, "association.accepted")),
            (evt.EVT_REJECTED, lambda e: self._audit_assoc(e, "association.refused", "failure")),
        ]
        _Server.allowed = [ipaddress.ip_network(h, strict=False) for h in self.settings.allowed_hosts]
        server = cast(_Server, ae.make_server((self.settings.host, self.settings.port),
                                              ssl_context=self._ssl_context(), evt_handlers=handlers,
                                              server_class=_Server))
        server.on_refused_host = self._audit_refused_host
        ae._servers.append(server)
        self._server = server
        if self.settings.processes > 1:
            # Fork before this process starts any thread of its own, and with no database
            # connection open: SQLite's per-process lock and WAL-index state must not be
            # inherited (a child then missed committed tables), and a PostgreSQL connection
            # must not be shared. Everyone reconnects on first use.
            self.engine.dispose()
            for _ in range(self.settings.processes - 1):
                self._fork_receiver(server)
        threading.Thread(target=server.serve_forever, name="dicom-listener", daemon=True).start()
        self._sweeper = threading.Thread(target=self._sweep_loop, name="stability-sweep", daemon=True)
        self._sweeper.start()
        port = int(server.server_address[1])
        log.info("listening as %s on %s:%d", self.settings.ae_title, self.settings.host, port)
        return port

    def _fork_receiver(self, server: _Server) -> None:
        pid = os.fork()
        if pid == 0:
            self._serve_in_child(server)
        self._children.append(pid)
        log.info("receiving process %d started", pid)

    def _serve_in_child(self, server: _Server) -> NoReturn:
        """A pre-forked receiving process: serve the inherited socket until told to stop or
        orphaned. Never returns into the parent's code."""
        code = 0
        try:
            parent = os.getppid()
            self._children = []
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which stops us
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            # Forget (without closing) anything the parent's pool held: ours are opened here.
            self.engine.dispose(close=False)

            def exit_with_parent() -> None:
                while os.getppid() == parent:
                    self._stop.wait(1.0)
                os._exit(0)

            threading.Thread(target=exit_with_parent, name="parent-watch", daemon=True).start()
            server.serve_forever()
        except BaseException:  # noqa: BLE001 - report, then leave without running parent code
            log.exception("receiving process %d failed", os.getpid())
            code = 1
        finally:
            os._exit(code)

    def _stop_children(self) -> None:
        for pid in self._children:
            try:
                os.kill(pid, signal.SIGTERM)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        self._children = []

    def _sweep_loop(self) -> None:
        while not self._stop.wait(self.study_settings.sweep_interval):
            try:
                sweep_stable(self.engine, stable_after=self.study_settings.stable_after, handoff=self.handoff)
            except Exception:  # noqa: BLE001 - a database hiccup must not end the sweeper
                log.exception("stability sweep failed; retrying next interval")

    def stop(self) -> None:
        self._stop.set()
        self._stop_children()
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def wait(self) -> None:
        """Block until :meth:`stop` (or Ctrl-C)."""
        try:
            while not self._stop.wait(1.0):
                pass
        except KeyboardInterrupt:
            self.stop()
