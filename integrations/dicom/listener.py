"""The DICOM Storage SCP (``taqrir listen``): the network engine of :mod:`.scp` over :mod:`.ingest`.

Choices, with the measurements behind them (shared PERFORMANCE-NOTES and RELIABILITY-NOTES, and
``bench/ingest.py``):

- The association and data path is :mod:`.scp` (pynetdicom's PDU codecs and presentation context
  negotiation, our own streaming receive): pynetdicom's threaded reactors capped a do-nothing
  handler at a fifth to a quarter of DCMTK storescp's throughput. Datasets stream from the socket
  into a hashing staging file in our storage's ``.incoming`` folder (same filesystem, so committing
  is an atomic rename), never whole in memory: whole-slide images can be gigabytes.
- Unrestricted storage negotiation: every storage SOP class (and private ones) is accepted with the
  first transfer syntax the sender proposes, stored as sent; Verification for C-ECHO.
- TCP_NODELAY on every accepted socket and a 128 KiB maximum PDU by default.
- Deliberate network/ACSE/DIMSE timeouts and an association limit, so that misbehaving peers free
  their slot; a free-space floor below which associations are refused with A-ASSOCIATE-RJ
  (transient, local limit exceeded) and C-STORE answers 0xA700.
- Handlers return DIMSE statuses and never raise into the network threads.
- An instance of up to ``listener.spool_max_bytes`` is answered once it is durable in the intake
  journal (:mod:`.intake`: one append and one flush) and indexed after the answer, in batches; an
  association's release waits for its instances to be indexed. Such an instance is received into
  memory (no staging file), and its file is written under its key after the answer. The journal
  segments a crash leaves are filed again in :meth:`Listener.start`, before anything is served. With
  ``listener.intake_journal`` off it is spooled instead (:mod:`.spool`): its bytes commit with its
  index row (one flush instead of three); either way its file is made durable after the answer.
- Instances are filed through one :class:`~.ingest.Ingestor` per process: concurrent associations
  share each index transaction and its disk flushes (a group commit), and each is answered once
  its own instance committed (``listener.group_commit_wait`` bounds how long a commit waits for
  instances other associations are preparing).
- ``listener.processes`` > 1 pre-forks receiving processes that accept on the same listening
  socket, each connection going to one of them: to the one holding the fewest connections, and
  ``listener.max_associations`` counts all of them together (:mod:`.shares`). One process is bound by the GIL to
  about one core; each process runs its own associations, handlers and database connections, and
  the index and audit chain serialise writers across processes as they do across threads. The
  parent also serves and alone runs the stability sweeper. A receiving process that is killed
  loses at most unacknowledged transfers, as any crash does, and a supervisor forks another in its
  place (:mod:`.receivers`); they all leave when the parent does. Every
  instance's index transaction holds the one index lock, which caps all processes together.
  ``taqrir listen`` runs one per CPU core (at most four) unless ``listener.processes`` is set; a
  listener embedded in another program runs one.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import select
import signal
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import pydicom.config
from sqlalchemy.engine import Engine

from audit.chain import record
from ground.db import session_scope
from storage import StagingFile, Storage, StorageFailure

from .config import ListenerSettings, StudySettings
from .errors import (
    STATUS_PROCESSING_FAILURE,
    STATUS_SUCCESS,
    DicomInputError,
    OutOfResources,
    refusal_status,
)
from .ingest import Ingestor, IngestResult, record_rejection, refile
from .intake import INTAKE_DIR_NAME, IntakeJournal, replay
from .outbox import read_commitment_report, record_commitment
from .receivers import exited, reap, start_supervisor
from .scp import ScpConfig, StorageScp
from .shares import Shares
from .spool import recover as recover_spool
from .stability import Handoff, log_handoff, sweep_stable

log = logging.getLogger(__name__)


#: How often :meth:`Listener.wait` looks whether a stop was requested.
_WAIT_POLL_SECONDS = 0.1

#: Seconds the listener waits for its receiving processes past ``stop_timeout``: each indexes
#: what it journaled before it exits.
_RECEIVER_EXIT_MARGIN = 15.0


def _say_ready(ready: int) -> None:
    """A receiving process tells the listener it serves (a byte on its pipe). A listener that
    stopped waiting (its 30 s were over) has closed the read end: the receiver serves all the
    same. Before, the write's BrokenPipeError ended it, and its replacement started over."""
    try:
        os.write(ready, b"1")
    except BrokenPipeError:
        log.warning("receiving process %d was ready after the listener stopped waiting for it; serving",
                    os.getpid())
    finally:
        os.close(ready)


def _wait_ready(pipes: list[int], *, timeout: float) -> None:
    """Wait until each receiving process has written to its pipe (or closed it: it failed, and
    said why in the log), at most ``timeout`` seconds in all, then close the pipes."""
    deadline = time.monotonic() + timeout
    try:
        for fd in pipes:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                log.warning("a receiving process was not ready after %.0f s; serving all the same", timeout)
                return
            os.read(fd, 1)
    finally:
        for fd in pipes:
            os.close(fd)


def _configure_pydicom() -> None:
    # Headers of real-world files violate VR rules often; read them, don't warn per element.
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE


class Listener:
    """A running Storage SCP plus its stability sweeper."""

    def __init__(
        self,
        *,
        settings: ListenerSettings,
        study_settings: StudySettings,
        engine: Engine,
        storage: Storage,
        handoff: Handoff = log_handoff,
        after_store: Callable[[IngestResult, str], None] | None = None,
    ) -> None:
        self.settings = settings
        #: receiving processes: ``listener.processes``, which ``taqrir listen`` sets from the
        #: cores when unset (:func:`~.config.receiving_processes`); an embedded listener receives
        #: in its program's process alone
        self.processes = settings.processes or 1
        #: Called with each stored instance and its calling AE once it is durably indexed (before
        #: Success is answered, or after it for a journaled instance): it must only hand off (e.g.
        #: the signed-SR reader queues SRs).
        self.after_store = after_store
        self.study_settings = study_settings
        self.engine = engine
        self.storage = storage
        self.handoff = handoff
        #: Files received instances, concurrent associations sharing each commit (per process:
        #: a forked receiver's kept connection is its own)
        self.journal_dir = storage.root / INTAKE_DIR_NAME
        self.ingestor = Ingestor(engine, storage, min_free_bytes=settings.min_free_bytes,
                                 max_sequence_depth=settings.max_sequence_depth,
                                 group_wait=settings.group_commit_wait,
                                 spool_max_bytes=settings.spool_max_bytes,
                                 journal=IntakeJournal(self.journal_dir) if settings.intake_journal else None,
                                 after_filing=after_store)
        self._server: StorageScp | None = None
        self._stop = threading.Event()
        self._stop_requested = False  # request_stop: a plain flag, set from a signal handler
        self._sweeper: threading.Thread | None = None
        #: the receiving processes' supervisor (:mod:`.receivers`), with ``processes`` > 1
        self._supervisor = 0
        #: receivers that die with a killed supervisor (pid -> whether their staging files are
        #: gone yet), kept until collected
        self._orphans: dict[int, bool] = {}
        #: held by whoever reads or changes ``_supervisor`` while others may: the sweeper's and
        #: the watcher's checks, and stop()
        self._supervision = threading.Lock()

    # -- pure-ish decisions -------------------------------------------------------------------
    def storage_low(self) -> bool:
        try:
            return self.storage.free_bytes() < self.settings.min_free_bytes
        except OSError:
            return True

    # -- the ScpHandler the network engine calls (statuses out, never raises) ------------------
    def refuse_associations(self) -> bool:
        return self.storage_low()

    def staging_file(self) -> StagingFile:
        # With the intake journal, an instance of up to spool_max_bytes is received into memory:
        # its bytes go into the journal, and its file is written under its key after the answer.
        memory_first = self.settings.spool_max_bytes if self.ingestor.journal is not None else 0
        return self.storage.staging_file(delete=False, suffix=".dcm", memory_first=memory_first)

    def store(self, calling_ae: str, sop_class_uid: str, sop_instance_uid: str, staged: Path) -> tuple[int, str]:
        try:
            self.ingestor.ingest(
                staged,
                calling_ae=calling_ae,
                announced_sop_instance_uid=sop_instance_uid or None,
                announced_sop_class_uid=sop_class_uid or None,
            )
        except (DicomInputError, OutOfResources, StorageFailure) as err:
            status = refusal_status(err)
            log.warning("C-STORE from %s refused with 0x%04X: %s", calling_ae, status, err)
            record_rejection(self.engine, calling_ae=calling_ae, sop_instance_uid=sop_instance_uid, err=err,
                             status=status)
            return status, str(err)
        except Exception as err:
            log.exception("C-STORE from %s failed unexpectedly", calling_ae)
            record_rejection(self.engine, calling_ae=calling_ae, sop_instance_uid=sop_instance_uid, err=err,
                             status=STATUS_PROCESSING_FAILURE)
            return STATUS_PROCESSING_FAILURE, f"processing failure ({type(err).__name__})"
        return STATUS_SUCCESS, ""

    def release(self) -> None:
        """The association is being released: wait until the instances it sent are indexed
        (journaled ones are answered before, :mod:`.intake`), so that a sender that has finished
        finds them all. Bounded by the DIMSE timeout: they are durable all the same."""
        if not self.ingestor.wait_indexed(self.settings.dimse_timeout):
            log.warning("instances of a released association still not indexed after %.0f s",
                        self.settings.dimse_timeout)

    def association_event(self, action: str, calling_ae: str, address: str, port: int, outcome: str,
                          reason: str = "") -> None:
        details = {"address": address, "called_ae": self.settings.ae_title}
        if reason:
            details["reason"] = reason
        try:
            with session_scope(self.engine) as session:
                record(session, action=action, actor=calling_ae, entity_type="Association",
                       entity_id=f"{address}:{port}", outcome=outcome, details=details)
        except Exception:
            log.exception("could not audit %s", action)

    def refused_command(self, calling_ae: str, sop_instance_uid: str, status: int, reason: str) -> None:
        record_rejection(self.engine, calling_ae=calling_ae, sop_instance_uid=sop_instance_uid,
                         err=ValueError(reason), status=status)

    def refused_host(self, host: str) -> None:
        try:
            with session_scope(self.engine) as session:
                record(session, action="association.refused", actor="", entity_type="Association",
                       entity_id=host, outcome="failure", details={"address": host, "reason": "host not allowed"})
        except Exception:
            log.exception("could not audit a refused host")

    def commitment_report(self, calling_ae: str, event_type_id: int, staged: Path) -> tuple[int, str]:
        """Storage Commitment results from a PACS (N-EVENT-REPORT, PS3.4 J.3.3) onto the outbox
        rows of that transaction (:func:`.outbox.record_commitment`)."""
        try:
            if not staged.exists():  # it stayed in memory (staging_file): on disk, no early fsync
                self.storage.hand_over(staged, sync_above=1 << 62)
            result = read_commitment_report(staged, event_type_id)
            with session_scope(self.engine) as session:
                record_commitment(session, transaction_uid=result[0], committed=result[1], failed=result[2],
                                  peer=calling_ae)
        except ValueError as err:
            log.warning("storage commitment report from %s not understood: %s", calling_ae, err)
            return STATUS_PROCESSING_FAILURE, str(err)[:64]
        except Exception:  # answer the sender, keep serving
            log.exception("storage commitment report from %s failed", calling_ae)
            return STATUS_PROCESSING_FAILURE, "processing failure"
        return STATUS_SUCCESS, ""

    # -- lifecycle ---------------------------------------------------------------------------
    def _config(self) -> ScpConfig:
        s = self.settings
        return ScpConfig(
            max_pdu=s.max_pdu,
            network_timeout=s.network_timeout,
            acse_timeout=s.acse_timeout,
            dimse_timeout=s.dimse_timeout,
            max_associations=s.max_associations,
            allowed_calling_aes=tuple(a.strip() for a in s.allowed_calling_aes),
            allowed_hosts=tuple(ipaddress.ip_network(h, strict=False) for h in s.allowed_hosts),
            ssl_context=self._ssl_context(),
        )

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
        _configure_pydicom()
        discarded = self.storage.discard_staged()
        if discarded:
            log.info("discarded %d partial transfers left by an earlier run", discarded)
        # Acknowledged small instances whose files an earlier run had not made durable yet
        # (:mod:`.spool`): written back before anything is served.
        recover_spool(self.engine, self.storage)
        self.replay_journal()
        server = StorageScp(self._config(), self, (self.settings.host, self.settings.port))
        self._server = server
        readies: list[int] = []
        if self.processes > 1:
            # Fork before this process starts any thread of its own, and with no database
            # connection open: SQLite's per-process lock and WAL-index state must not be
            # inherited (a child then missed committed tables), and a PostgreSQL connection
            # must not be shared. Everyone reconnects on first use.
            self.engine.dispose()
            # they split parallel associations evenly and keep max_associations together (.shares)
            shares = Shares(self.processes)
            server.share(shares)
            # forked by a supervisor that replaces one that dies (.receivers)
            self._supervisor, readies = start_supervisor(
                lambda index, ready: self._serve_receiver(server, index, ready),
                list(range(1, self.processes)), on_exit=lambda index, pid: self._receiver_exited(shares, index, pid))
        self._open_journal()
        # serve once every receiver is ready: preparing its journal segment (16 MiB written and
        # flushed) would otherwise share the disk with the first transfers (bench/README.md)
        _wait_ready(readies, timeout=30.0)
        threading.Thread(target=server.serve_forever, name="dicom-listener", daemon=True).start()
        self._sweeper = threading.Thread(target=self._sweep_loop, name="stability-sweep", daemon=True)
        self._sweeper.start()
        if self._supervisor:
            threading.Thread(target=self._watch_supervisor, args=(self._supervisor,), name="supervisor-watch",
                             daemon=True).start()
        port = int(server.server_address[1])
        log.info("listening as %s on %s:%d", self.settings.ae_title, self.settings.host, port)
        return port

    def _open_journal(self) -> None:
        """This process's journal segment, preallocated before the first instance needs it (after
        forking: a segment's lock must not be shared with a child)."""
        if self.ingestor.journal is not None:
            try:
                self.ingestor.journal.open()
            except OSError:
                log.exception("could not prepare the intake journal in %s; the first instance tries again",
                              self.journal_dir)

    def replay_journal(self) -> int:
        """File again what the intake journal segments of processes no longer running hold
        (:func:`.intake.replay`): before serving, and in the sweeper (a receiving process that
        died). Never raises; returns how many records were read."""
        try:
            count = replay(self.journal_dir, lambda record: refile(self.engine, self.storage, record))
        except Exception:
            log.exception("replaying the intake journal failed; retried at the next sweep")
            return 0
        if count:
            log.info("replayed %d journaled instance(s) left by an earlier run", count)
        return count

    def _serve_receiver(self, server: StorageScp, index: int, ready: int | None) -> NoReturn:
        """Receiving process ``index`` (forked by the supervisor, :mod:`.receivers`): serve the
        inherited socket until told to stop, saying on ``ready`` (a pipe) when it is about to."""
        assert server.shares is not None
        server.shares.become(index)
        # SIGTERM (from the supervisor when the listener stops, and from a service manager that
        # signals the whole group): accept no more, drain, index. The handler only sets a flag.
        signal.signal(signal.SIGTERM, lambda signum, frame: server.request_stop())
        # Forget (without closing) anything the parent's pool held: ours are opened here.
        self.engine.dispose(close=False)
        self._open_journal()
        if ready is not None:
            _say_ready(ready)
        server.serve_forever()
        server.shutdown()
        self._drain(server)
        self.ingestor.close()
        os._exit(0)

    def _receiver_exited(self, shares: Shares, index: int, pid: int) -> None:
        """In the supervisor, receiver ``index`` (process ``pid``) having exited: its connections
        died with it (its slot in the shares is cleared) and so did its transfers, whose partial
        staging files and spares are removed (what it answered is in place or in its journal
        segment, which the sweep files again). Never raises: the supervisor goes on. The slot is
        cleared after the files go: were the supervisor killed in between, the listener still
        finds this pid there and removes them (:meth:`_check_supervisor`)."""
        self._discard_staged_of(pid)
        shares.clear(index)

    def _discard_staged_of(self, pid: int) -> None:
        """Remove the partial transfers and spares of receiving process ``pid``, which has exited.
        Never raises (what it could not remove goes at the next start)."""
        try:
            removed = self.storage.discard_staged(process=pid)
        except OSError as err:
            log.warning("could not remove the staging files of receiving process %d: %s (they go at the next "
                        "start)", pid, err)
            return
        if removed:
            log.info("removed %d partial transfer(s) of receiving process %d", removed, pid)

    def _check_supervisor(self) -> None:
        """The supervisor exits only when told to, or when killed: its receivers then die with
        it (the kernel's SIGKILL, :func:`.receivers.die_with_parent`), and this process goes on
        receiving alone. Their journal segments are replayed by the sweep, and their partial
        transfers and spares removed once each is gone (before, they stayed until the next
        start: a whole-slide image's gigabytes for as long as the listener ran)."""
        if self._stop.is_set():  # stopping: stop() waits for it
            return
        supervisor = self._supervisor  # (under _supervision)
        if supervisor:
            try:
                done, status = os.waitpid(supervisor, os.WNOHANG)
            except ChildProcessError:
                done, status = supervisor, 0
            if done:
                log.error("the receiving processes' supervisor %d exited (status %d): this process goes on "
                          "receiving alone; restart taqrir listen to serve with %d again", supervisor,
                          status, self.processes)
                self._supervisor = 0
                shares = self._server.shares if self._server is not None else None
                if shares is not None:
                    for index in range(1, self.processes):
                        pid = shares.pid(index)  # (read once; 0: a slot no receiver held)
                        if pid:
                            self._orphans.setdefault(pid, False)
                        shares.clear(index)
        for pid in [pid for pid in self._orphans if exited(pid)]:
            if not self._orphans[pid]:
                self._discard_staged_of(pid)
                self._orphans[pid] = True
            if reap(pid):  # after its files: the pid is free for reuse once reaped
                del self._orphans[pid]

    def _watch_supervisor(self, pid: int) -> None:
        """Notice the supervisor's death at once (a pidfd, readable when it exits) instead of at
        the next sweep (``study.sweep_interval``, 5 s): until then its dead receivers' slots in
        the shares still counted their associations, so that a listener near
        ``max_associations`` refused new ones, and their partial transfers stayed. Where pidfds
        are missing (Linux before 5.3, other systems), the sweep notices as before."""
        try:
            fd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            return
        try:
            poller = select.poll()  # (select's descriptors stop at 1024; a busy listener has more)
            poller.register(fd, select.POLLIN)
            poller.poll()
        except OSError:
            return
        finally:
            os.close(fd)
        deadline = time.monotonic() + 5.0  # the receivers die with it, a moment later
        while True:
            with self._supervision:
                self._check_supervisor()
                if (not self._supervisor and not self._orphans) or self._stop.is_set() \
                        or time.monotonic() > deadline:
                    return  # (what is left goes at a sweep)
            self._stop.wait(0.02)

    def _wait_receivers(self, supervisor: int) -> None:
        """Wait for the supervisor, which waits for its receivers to drain (SIGTERM, sent by
        :meth:`stop`); past ``stop_timeout`` and a margin for indexing what they journaled, kill
        it (its receivers die with it; their journal segments are replayed)."""
        if not supervisor:
            return
        deadline = time.monotonic() + self.settings.stop_timeout + _RECEIVER_EXIT_MARGIN
        try:
            while not os.waitpid(supervisor, os.WNOHANG)[0]:
                if time.monotonic() > deadline:
                    log.warning("the receiving processes did not stop in time; killing them")
                    os.kill(supervisor, signal.SIGKILL)
                    os.waitpid(supervisor, 0)
                    break
                time.sleep(0.05)
        except (ProcessLookupError, ChildProcessError):
            pass

    def _drain(self, server: StorageScp) -> None:
        left = server.drain(self.settings.stop_timeout)
        if left:
            log.warning("%d connection(s) still open %.0f s after the stop began: cut (the sender sends "
                        "again what was not answered)", left, self.settings.stop_timeout)

    def _sweep_loop(self) -> None:
        while not self._stop.wait(self.study_settings.sweep_interval):
            if self.processes > 1:
                with self._supervision:
                    self._check_supervisor()
                self.replay_journal()  # a receiving process that died leaves its segment
            try:
                sweep_stable(self.engine, stable_after=self.study_settings.stable_after, handoff=self.handoff)
            except Exception:
                log.exception("stability sweep failed; retrying next interval")

    def stop(self) -> None:
        """Stop receiving without cutting a sender short: new connections are refused at once
        (by every receiving process: they share the listening socket), running associations
        finish, ``listener.stop_timeout`` seconds at most, and what was journaled is indexed.
        Before, SIGTERM cut every running association: the sender saw its association aborted
        mid-study and had to send again what had not been answered."""
        self._stop.set()
        with self._supervision:  # read once a check under way is over: none reaps it after this
            supervisor, self._supervisor = self._supervisor, 0
        if supervisor:
            # first: it stops its receivers, which drain, instead of replacing one that saw the
            # listening socket stop listening and ended (a pid 0 would signal the whole group)
            try:
                os.kill(supervisor, signal.SIGTERM)
            except ProcessLookupError:
                pass
        server, self._server = self._server, None
        if server is not None:
            server.refuse_connections()
            server.shutdown()
            self._drain(server)
        self._wait_receivers(supervisor)
        self.ingestor.close()
        if self.processes > 1:
            self.replay_journal()  # what stopped receiving processes had not indexed

    def request_stop(self) -> None:
        """Make :meth:`wait` return; the caller then calls :meth:`stop`. Safe from a signal
        handler: it only sets a flag. (Setting an ``Event`` there could hang: the handler runs
        in the main thread, possibly inside ``Event.wait`` holding the event's lock.)"""
        self._stop_requested = True

    def wait(self) -> None:
        """Block until :meth:`stop` or :meth:`request_stop` (or Ctrl-C)."""
        try:
            while not (self._stop_requested or self._stop.is_set()):
                time.sleep(_WAIT_POLL_SECONDS)  # a signal's handler runs within it
        except KeyboardInterrupt:
            self.stop()
