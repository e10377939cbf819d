"""The Storage SCP's network engine: DICOM Upper Layer acceptor for C-STORE and C-ECHO.

Why not pynetdicom's association machinery for the data path: measured here (300-slice CT,
0.5 MB per instance, one DCMTK storescu association), a bare pynetdicom SCP whose handler did
nothing received 123–160 instances/s against DCMTK storescp's ~640: each instance crosses two
threads that poll with 1 ms sleeps (the DUL reactor and the association reactor), PDUs are read
in 4 KiB ``recv`` calls, decoded into objects and copied several times, and the temporary file is
flushed per fragment. The ingest target (half of storescp with durable writes and indexing) is out
of reach on that path, however cheap the handler.

What this module does instead, per association, in one thread and without polling:

- Association establishment uses pynetdicom's own pieces: the A-ASSOCIATE-RQ/AC PDU codecs and its
  presentation context negotiation for an unrestricted Storage SCP
  (:func:`pynetdicom.presentation.negotiate_unrestricted`: every storage, private or unknown SOP
  class with the first transfer syntax proposed, plus Verification; other services rejected), and
  SCP/SCU role selection replies.
- The data phase streams each P-DATA-TF PDU from the socket: PDV headers are read as they come,
  command fragments are collected (64 KiB at most) and decoded by :mod:`.dimse`, dataset fragments
  go straight from ``recv_into`` a reusable buffer into the storage's hashing staging file, behind
  a File Meta header built from the command and the negotiated transfer syntax. Nothing is held in
  memory beyond one buffer, whatever the size of the instance (whole-slide images).
- Every failure ends the way PS3.8 says: A-ASSOCIATE-RJ for refusals (calling AE not allowed,
  unsupported protocol version or application context, too many associations, low disk),
  A-ABORT for malformed or unexpected PDUs, A-RELEASE-RP for a release; timeouts free the slot
  (``acse_timeout`` to finish negotiation, ``network_timeout`` of silence between messages,
  ``dimse_timeout`` inside one), and an exception never escapes the association thread.

The service itself (what to do with a received instance, auditing) is a :class:`ScpHandler`.
"""

from __future__ import annotations

import errno
import logging
import select
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from pydicom.uid import UID
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import build_context, negotiate_unrestricted

from . import dimse
from .shares import Shares

log = logging.getLogger(__name__)

#: Our Implementation Class UID (PS3.7 D.3.3.2): a UUID-derived UID (PS3.5 B.2), fixed for Taqrir.
IMPLEMENTATION_CLASS_UID = "2.25.167453061934591254788203146738213307461"
IMPLEMENTATION_VERSION = "TAQRIR_1"
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"
#: Storage Commitment Push Model (PS3.4 J.3): results come back to us as N-EVENT-REPORT.
STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"
_VERIFICATION_SYNTAXES = ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"]

#: An A-ASSOCIATE-RQ larger than this is not a real one (128 contexts with 30 syntaxes each stay
#: well below); the length field of a hostile one may say 4 GiB.
MAX_ASSOCIATE_RQ = 1 << 20
STATUS_UNRECOGNIZED_OPERATION = 0x0211
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122
STATUS_DATASET_MISMATCH = 0xA900
STATUS_INVALID_SOP_INSTANCE = 0x0117

_PDU_HEADER = struct.Struct(">BBL")
_PDV_HEADER = struct.Struct(">LBB")
_BUFFER = 1 << 18


class ScpHandler(Protocol):
    """What the network engine asks of the service."""

    def refuse_associations(self) -> bool:
        """True while new associations must be refused (e.g. storage below its free-space floor)."""

    def staging_file(self) -> Any:
        """A new writable staging file with ``name``, ``write``, ``flush`` and ``close`` (its bytes
        may stay in memory: the handler, not this engine, reads the file at ``name``)."""

    def store(self, calling_ae: str, sop_class_uid: str, sop_instance_uid: str, staged: Path) -> tuple[int, str]:
        """Store a received instance; returns (DIMSE status, error comment). Never raises."""

    def association_event(self, action: str, calling_ae: str, address: str, port: int, outcome: str,
                          reason: str = "") -> None:
        """Audit an association accepted or refused. Never raises."""

    def release(self) -> None:
        """The peer asked to release the association (A-RELEASE-RQ); called in its thread before
        the A-RELEASE-RP, e.g. to finish what its instances started. Never raises."""

    def refused_host(self, host: str) -> None:
        """Audit a connection from a host outside the allow-list. Never raises."""

    def refused_command(self, calling_ae: str, sop_instance_uid: str, status: int, reason: str) -> None:
        """Audit an instance this engine refused before its dataset (a command whose UID is not
        a UID), as the handler audits those it refuses. Never raises."""

    def commitment_report(self, calling_ae: str, event_type_id: int, staged: Path) -> tuple[int, str]:
        """A Storage Commitment result (N-EVENT-REPORT, its dataset staged as a Part 10 file);
        returns (DIMSE status, error comment). Never raises."""


@dataclass(frozen=True)
class ScpConfig:
    max_pdu: int
    network_timeout: float
    acse_timeout: float
    dimse_timeout: float
    max_associations: int
    allowed_calling_aes: tuple[str, ...] = ()
    allowed_hosts: tuple[Any, ...] = ()  # ipaddress networks
    ssl_context: ssl.SSLContext | None = None


class _Abort(Exception):
    """End the association with an A-ABORT (source 2 = service provider) and this reason."""

    def __init__(self, reason: int, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class _Closed(Exception):
    """The peer closed the connection (or went silent past a timeout)."""


def _abort_pdu(source: int, reason: int) -> bytes:
    return _PDU_HEADER.pack(0x07, 0, 4) + bytes((0, 0, source, reason))


def _reject_pdu(result: int, source: int, diagnostic: int) -> bytes:
    return _PDU_HEADER.pack(0x03, 0, 4) + bytes((0, result, source, diagnostic))


_RELEASE_RP = _PDU_HEADER.pack(0x06, 0, 4) + b"\x00" * 4


@dataclass
class _Store:
    """One C-STORE being received."""

    context_id: int
    command: dimse.Command
    writer: Any  # the staging file, None once a write failed
    failure: tuple[int, str] | None = None
    path: Path | None = None


@dataclass
class _Slots:
    """Associations held, against ``max_associations``: this process's, or with ``shares`` all the
    receiving processes' together."""

    limit: int
    active: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    shares: Shares | None = None

    def take(self) -> bool:
        with self.lock:
            if self.shares is not None:
                if not self.shares.take_association(self.limit):
                    return False
            elif self.active >= self.limit:
                return False
            self.active += 1
            return True

    def give(self) -> None:
        with self.lock:
            self.active -= 1
            if self.shares is not None:
                self.shares.give_association()


class Association:
    """One accepted connection, from A-ASSOCIATE-RQ to release or abort (runs in its own thread)."""

    def __init__(self, server: StorageScp, sock: socket.socket, address: tuple[str, int]) -> None:
        self.server = server
        self.config = server.config
        self.handler = server.handler
        self.sock = sock
        self.address, self.port = address[0], int(address[1])
        self.calling_ae = ""
        self._contexts: dict[int, tuple[str, str]] = {}  # id -> (abstract syntax, transfer syntax)
        self._peer_max_pdv = 0
        self._command = bytearray()
        self._store: _Store | None = None
        self._buffer = bytearray(_BUFFER)
        self._view = memoryview(self._buffer)
        self._has_slot = False
        #: while negotiating: when acse_timeout runs out for the whole request (monotonic)
        self._deadline = 0.0

    # -- socket helpers -------------------------------------------------------------------
    def _recv_exact(self, n: int) -> bytes:
        out = bytearray(n)
        view = memoryview(out)
        got = 0
        while got < n:
            k = self._recv_into(view[got:], n - got)
            got += k
        return bytes(out)

    def _recv_into(self, view: memoryview, n: int) -> int:
        if self._deadline:
            left = self._deadline - time.monotonic()
            if left <= 0:
                raise _Closed("the peer did not finish its association request within acse_timeout")
            self.sock.settimeout(left)
        try:
            k = self.sock.recv_into(view, n)
        except TimeoutError as err:
            raise _Closed("the peer went silent") from err
        except OSError as err:
            raise _Closed(f"connection lost: {err}") from err
        if not k:
            raise _Closed("the peer closed the connection")
        return k

    def _send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as err:
            raise _Closed(f"connection lost: {err}") from err

    def _header(self) -> tuple[int, int]:
        pdu_type, _, length = _PDU_HEADER.unpack(self._recv_exact(6))
        return pdu_type, length

    # -- lifecycle ------------------------------------------------------------------------
    def run(self) -> None:
        try:
            # with a timeout set, CPython's do_handshake holds the whole handshake to it (a
            # deadline, not a per-receive timeout: test_tls's trickled ClientHello)
            self.sock.settimeout(self.config.acse_timeout)
            if isinstance(self.sock, ssl.SSLSocket):
                self.sock.do_handshake()
            if self._establish():
                self._data_phase()
        except _Abort as err:
            log.warning("aborting association from %s (%s:%d): %s", self.calling_ae or "?", self.address,
                        self.port, err)
            try:
                self.sock.sendall(_abort_pdu(0x02, err.reason))
            except OSError:
                pass
        except _Closed as err:
            log.info("association from %s (%s:%d) ended: %s", self.calling_ae or "?", self.address, self.port, err)
        except (ssl.SSLError, OSError) as err:
            log.warning("connection from %s:%d failed: %s", self.address, self.port, err)
        except Exception:
            log.exception("association from %s:%d failed unexpectedly", self.address, self.port)
            try:
                self.sock.sendall(_abort_pdu(0x02, 0x00))
            except OSError:
                pass
        finally:
            self._discard_store()
            if self._has_slot:
                self.server.slots.give()
            try:
                self.sock.close()
            except OSError:
                pass
            self.server.connection_ended()

    def _establish(self) -> bool:
        # acse_timeout bounds the whole request (PS3.8's ARTIM), not each receive: a peer that
        # trickles a byte at a time held a connection (and its thread) for as long as it liked
        self._deadline = time.monotonic() + self.config.acse_timeout
        try:
            return self._negotiate()
        finally:
            self._deadline = 0.0

    def _negotiate(self) -> bool:
        pdu_type, length = self._header()
        if pdu_type != 0x01:
            raise _Abort(0x02, f"expected an A-ASSOCIATE-RQ, got PDU type 0x{pdu_type:02X}")
        if length > MAX_ASSOCIATE_RQ:
            raise _Abort(0x06, f"A-ASSOCIATE-RQ of {length} bytes is not plausible")
        raw = _PDU_HEADER.pack(pdu_type, 0, length) + self._recv_exact(length)
        try:
            pdu = A_ASSOCIATE_RQ()
            pdu.decode(raw)
            rq = pdu.to_primitive()
        except Exception as err:
            raise _Abort(0x06, f"A-ASSOCIATE-RQ could not be decoded: {err}") from err
        self.calling_ae = str(rq.calling_ae_title or "").strip()
        refusal = self._refusal(rq, pdu.protocol_version)
        if refusal is not None:
            (result, source, diagnostic), reason = refusal
            log.info("refusing association from %s (%s:%d): %s", self.calling_ae, self.address, self.port, reason)
            self._send(_reject_pdu(result, source, diagnostic))
            self.handler.association_event("association.refused", self.calling_ae, self.address, self.port,
                                           "failure", reason)
            self._linger()
            return False
        self._send(self._accept(rq))
        self.handler.association_event("association.accepted", self.calling_ae, self.address, self.port, "success")
        return True

    def _refusal(self, rq: A_ASSOCIATE, protocol_version: int) -> tuple[tuple[int, int, int], str] | None:
        cfg = self.config
        if protocol_version & 0x0001 == 0:
            return (0x01, 0x02, 0x02), f"protocol version {protocol_version} not supported"
        if str(rq.application_context_name) != APPLICATION_CONTEXT:
            return (0x01, 0x01, 0x02), f"application context {rq.application_context_name} not supported"
        if cfg.allowed_calling_aes and self.calling_ae not in cfg.allowed_calling_aes:
            return (0x01, 0x01, 0x03), f"calling AE title {self.calling_ae!r} not allowed"
        if self.handler.refuse_associations():
            return (0x02, 0x03, 0x02), "storage below its free-space floor"
        if not self.server.slots.take():
            return (0x02, 0x03, 0x02), f"{cfg.max_associations} associations already active"
        self._has_slot = True
        return None

    def _accept(self, rq: A_ASSOCIATE) -> bytes:
        roles = {item.sop_class_uid: (item.scu_role, item.scp_role) for item in rq.user_information
                 if isinstance(item, SCP_SCU_RoleSelectionNegotiation) and item.sop_class_uid is not None}
        for item in rq.user_information:
            if isinstance(item, MaximumLengthNotification):
                self._peer_max_pdv = max(0, int(item.maximum_length_received or 0) - 6)
        results, reply_roles = negotiate_unrestricted(
            rq.presentation_context_definition_list,
            [self.server.verification_context, self.server.commitment_context], roles)
        self._contexts = {int(cx.context_id or 0): (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                          for cx in results if cx.result == 0x00}
        ac = A_ASSOCIATE()
        ac.application_context_name = UID(APPLICATION_CONTEXT)
        ac.calling_ae_title = rq.calling_ae_title
        ac.called_ae_title = rq.called_ae_title
        ac.result = 0x00
        ac.result_source = 0x01
        ac.presentation_context_definition_results_list = results
        max_len = MaximumLengthNotification()
        max_len.maximum_length_received = self.config.max_pdu
        impl = ImplementationClassUIDNotification()
        impl.implementation_class_uid = UID(IMPLEMENTATION_CLASS_UID)
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = IMPLEMENTATION_VERSION
        ac.user_information = [max_len, impl, version, *reply_roles]
        pdu = A_ASSOCIATE_AC()
        pdu.from_primitive(ac)
        return bytes(pdu.encode())

    def _linger(self) -> None:
        """After a reject, give the peer a moment to close first (PS3.8 ARTIM), then close."""
        try:
            self.sock.settimeout(min(self.config.acse_timeout, 2.0))
            self.sock.recv(1)
        except OSError:
            pass

    # -- data phase -----------------------------------------------------------------------
    def _data_phase(self) -> None:
        while True:
            self.sock.settimeout(self.config.network_timeout)
            pdu_type, length = self._header()
            self.sock.settimeout(self.config.dimse_timeout)
            if pdu_type == 0x04:
                self._p_data(length)
            elif pdu_type == 0x05:
                if length != 4:
                    raise _Abort(0x06, f"A-RELEASE-RQ of length {length}")
                self._recv_exact(4)
                try:
                    self.handler.release()
                except Exception:  # answer the release all the same
                    log.exception("release handler failed")
                self._send(_RELEASE_RP)
                self._linger()
                return
            elif pdu_type == 0x07:
                if length == 4:
                    self._recv_exact(4)
                raise _Closed("the peer aborted the association")
            elif pdu_type in (0x01, 0x02, 0x03, 0x06):
                raise _Abort(0x02, f"unexpected PDU type 0x{pdu_type:02X} in an established association")
            else:
                raise _Abort(0x01, f"unrecognised PDU type 0x{pdu_type:02X}")

    def _p_data(self, length: int) -> None:
        remaining = length
        while remaining:
            if remaining < 6:
                raise _Abort(0x06, "P-DATA-TF ends inside a PDV item header")
            item_len, context_id, control = _PDV_HEADER.unpack(self._recv_exact(6))
            if item_len < 2 or item_len + 4 > remaining:
                raise _Abort(0x06, f"PDV item of length {item_len} does not fit its P-DATA-TF")
            remaining -= 4 + item_len
            n = item_len - 2
            if context_id not in self._contexts:
                raise _Abort(0x06, f"PDV on presentation context {context_id}, which was not accepted")
            if control & 0x01:
                if self._store is not None:
                    raise _Abort(0x02, "a command started before the previous dataset ended")
                if len(self._command) + n > dimse.MAX_COMMAND_BYTES:
                    raise _Abort(0x06, "command set larger than 64 KiB")
                self._command += self._recv_exact(n)
                if control & 0x02:
                    command, self._command = bytes(self._command), bytearray()
                    self._on_command(context_id, command)
            else:
                store = self._store
                if store is None or store.context_id != context_id:
                    raise _Abort(0x02, "dataset fragment without a C-STORE command on its context")
                self._stream(store, n)
                if control & 0x02:
                    self._store = None
                    self._finish(store)

    def _on_command(self, context_id: int, raw: bytes) -> None:
        try:
            cmd = dimse.decode_command(raw)
        except dimse.CommandError as err:
            raise _Abort(0x06, f"command set could not be decoded: {err}") from err
        abstract, transfer = self._contexts[context_id]
        if cmd.command_field == dimse.C_ECHO_RQ and not cmd.has_dataset:
            self._respond(context_id, dimse.encode_response(dimse.C_ECHO_RSP, cmd.message_id, 0x0000,
                                                             sop_class_uid=VERIFICATION))
            return
        is_report = cmd.command_field == dimse.N_EVENT_REPORT_RQ and abstract == STORAGE_COMMITMENT
        if (cmd.command_field != dimse.C_STORE_RQ or abstract == VERIFICATION) and not is_report:
            if cmd.has_dataset:  # take the dataset off the wire, then answer
                self._store = _Store(context_id, cmd, None, (STATUS_UNRECOGNIZED_OPERATION, "operation not supported"))
                return
            self._respond(context_id, dimse.encode_response(
                (cmd.command_field | 0x8000) & 0xFFFF, cmd.message_id, STATUS_UNRECOGNIZED_OPERATION,
                error_comment="only C-STORE and C-ECHO are supported"))
            return
        invalid = self._invalid_uids(cmd)
        if invalid is not None:
            cmd, comment = invalid
            if cmd.has_dataset:  # take the dataset off the wire, then answer
                self._store = _Store(context_id, cmd, None, (STATUS_INVALID_SOP_INSTANCE, comment))
            else:
                self._answer(context_id, cmd, STATUS_INVALID_SOP_INSTANCE, comment)
            return
        if not cmd.has_dataset:  # a report without its Event Information: a processing failure
            self._answer(context_id, cmd, 0x0110 if is_report else STATUS_DATASET_MISMATCH,
                         "request without a dataset")
            return
        sop_class = cmd.affected_sop_class_uid or abstract
        store = _Store(context_id, cmd, None)
        try:
            store.writer = self.handler.staging_file()
            store.path = Path(store.writer.name)
            store.writer.write(dimse.file_meta(
                sop_class_uid=sop_class, sop_instance_uid=cmd.affected_sop_instance_uid,
                transfer_syntax_uid=transfer, implementation_class_uid=IMPLEMENTATION_CLASS_UID,
                implementation_version=IMPLEMENTATION_VERSION, source_ae=self.calling_ae))
        except OSError as err:
            store.failure = (0xA700, f"cannot stage the instance: {err.strerror or err}")
            self._close_writer(store)
        self._store = store

    def _invalid_uids(self, cmd: dimse.Command) -> tuple[dimse.Command, str] | None:
        """A command whose affected SOP Class or Instance UID is not a UID (PS3.5 9.1): the
        command without them (an answer cannot echo them: a non-ASCII byte there made encoding
        the answer raise, and the association was aborted as an internal failure) and why. The
        instance is refused with 0x0117 (invalid SOP instance, PS3.7 C.4.2); the association
        goes on."""
        bad = {name: uid for name, uid in (("SOP Class", cmd.affected_sop_class_uid),
                                           ("SOP Instance", cmd.affected_sop_instance_uid))
               if uid and not dimse.is_valid_uid(uid)}
        if not bad:
            return None
        # as text any log and database takes: NUL and non-ASCII characters escaped
        why = " and ".join(f"Affected {name} UID {uid!a} is not a UID (PS3.5 9.1)"
                           for name, uid in bad.items())
        log.warning("refusing a request from %s (%s:%d): %s", self.calling_ae or "?", self.address, self.port, why)
        self.handler.refused_command(self.calling_ae, ascii(cmd.affected_sop_instance_uid)[1:-1][:64],
                                     STATUS_INVALID_SOP_INSTANCE, why)
        cleared = replace(cmd, affected_sop_class_uid="" if "SOP Class" in bad else cmd.affected_sop_class_uid,
                          affected_sop_instance_uid="" if "SOP Instance" in bad else cmd.affected_sop_instance_uid)
        return cleared, f"Affected {' and '.join(bad)} UID is not a valid UID"

    def _stream(self, store: _Store, n: int) -> None:
        view, size = self._view, len(self._buffer)
        while n:
            k = self._recv_into(view, min(n, size))
            n -= k
            if store.writer is not None:
                try:
                    store.writer.write(view[:k])
                except OSError as err:
                    store.failure = (0xA700, f"cannot write the instance: {err.strerror or err}")
                    self._close_writer(store)

    def _finish(self, store: _Store) -> None:
        cmd = store.command
        abstract = self._contexts[store.context_id][0]
        if store.failure is None:
            try:
                store.writer.flush()
            except (OSError, ValueError) as err:
                store.failure = (0xA700, f"cannot write the instance: {err}")
            else:
                store.failure = self._handle(cmd, abstract, store.path)  # type: ignore[arg-type]
        status, comment = store.failure
        self._close_writer(store)
        _remove_staged(store.path)  # still there unless the handler moved it into storage
        self._answer(store.context_id, cmd, status, comment)

    def _answer(self, context_id: int, cmd: dimse.Command, status: int, comment: str) -> None:
        """The response to a request on ``context_id``: a C-STORE-RSP, an N-EVENT-REPORT-RSP (a
        report answered with a C-STORE-RSP before, when it came without a dataset), or the
        generic response of an operation we do not support."""
        abstract = self._contexts[context_id][0]
        if cmd.command_field == dimse.C_STORE_RQ and abstract != VERIFICATION:
            self._respond(context_id, self._store_response(cmd, abstract, status, comment))
        elif cmd.command_field == dimse.N_EVENT_REPORT_RQ:
            self._respond(context_id, dimse.encode_response(
                dimse.N_EVENT_REPORT_RSP, cmd.message_id, status, sop_class_uid=abstract,
                sop_instance_uid=cmd.affected_sop_instance_uid, error_comment=comment if status else "",
                event_type_id=cmd.event_type_id))
        else:
            self._respond(context_id, dimse.encode_response(
                (cmd.command_field | 0x8000) & 0xFFFF, cmd.message_id, status, error_comment=comment))

    def _handle(self, cmd: dimse.Command, abstract: str, path: Path) -> tuple[int, str]:
        """The service's answer to a received dataset: a stored instance, or a commitment result."""
        if cmd.command_field == dimse.N_EVENT_REPORT_RQ:
            return self.handler.commitment_report(self.calling_ae, cmd.event_type_id, path)
        return self.handler.store(self.calling_ae, cmd.affected_sop_class_uid or abstract,
                                  cmd.affected_sop_instance_uid, path)

    @staticmethod
    def _store_response(cmd: dimse.Command, abstract: str, status: int, comment: str) -> bytes:
        return dimse.encode_response(dimse.C_STORE_RSP, cmd.message_id, status,
                                     sop_class_uid=cmd.affected_sop_class_uid or abstract,
                                     sop_instance_uid=cmd.affected_sop_instance_uid,
                                     error_comment=comment if status else "")

    def _respond(self, context_id: int, command: bytes) -> None:
        """Send a command set in P-DATA-TF PDUs no larger than the peer accepts."""
        step = self._peer_max_pdv if self._peer_max_pdv > 0 else len(command)
        out = bytearray()
        for start in range(0, len(command), step):
            chunk = command[start:start + step]
            last = start + step >= len(command)
            out += _PDU_HEADER.pack(0x04, 0, len(chunk) + 6)
            out += _PDV_HEADER.pack(len(chunk) + 2, context_id, 0x03 if last else 0x01)
            out += chunk
        self._send(bytes(out))

    @staticmethod
    def _close_writer(store: _Store) -> None:
        if store.writer is not None:
            try:
                store.writer.close()
            except OSError:
                pass
            store.writer = None

    def _discard_store(self) -> None:
        store, self._store = self._store, None
        if store is not None:
            self._close_writer(store)
            _remove_staged(store.path)


#: How long the accept loop waits after select or accept failed (out of descriptors, say)
ACCEPT_BACKOFF_SECONDS = 0.1


class _Trouble:
    """Log a repeating accept failure once, then once a minute with how many times it failed."""

    def __init__(self) -> None:
        self.count = 0
        self.logged = 0.0

    def report(self, what: str, err: BaseException) -> None:
        self.count += 1
        now = time.monotonic()
        if self.count == 1 or now - self.logged >= 60.0:
            log.error("%s (%d time(s) so far; still serving, trying again every %.1f s): %s", what, self.count,
                      ACCEPT_BACKOFF_SECONDS, err)
            self.logged = now

    def clear(self) -> None:
        if self.count:
            log.info("accepting connections again after %d failure(s)", self.count)
        self.count = 0


#: How long a pre-forked process that holds more connections than another leaves a pending one
#: to it (busy with the GIL, the other may be slow to wake), before accepting it itself.
YIELD_ACCEPT_SECONDS = 0.05


class StorageScp:
    """Accepts connections on one listening socket, one thread per association."""

    def __init__(self, config: ScpConfig, handler: ScpHandler, address: tuple[str, int]) -> None:
        self.config = config
        self.handler = handler
        self.slots = _Slots(config.max_associations)
        self.verification_context = build_context(VERIFICATION, _VERIFICATION_SYNTAXES)
        # A PACS reports Storage Commitment results on an association it opens, usually taking
        # the SCP role for the SOP class (SCP/SCU role selection, PS3.7 D.3.3.4): allow either.
        self.commitment_context = build_context(STORAGE_COMMITMENT, _VERIFICATION_SYNTAXES)
        self.commitment_context.scu_role = True
        self.commitment_context.scp_role = True
        # Connections not yet associated are capped too (half-open peers hold no slot, but each
        # holds a thread until acse_timeout): beyond this, new connections are closed at once.
        self._max_connections = 4 * config.max_associations + 16
        self._connections = 0
        #: shared with the other receiving processes, when pre-forked (:meth:`share`)
        self.shares: Shares | None = None
        self._lock = threading.Lock()
        self._ended = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._stop_requested = False  # request_stop: a plain flag, set from a signal handler
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(address)
        self.socket.listen(128)
        # Never block in accept(): with several processes on one listening socket, all wake for a
        # connection and those that lose the race go back to waiting.
        self.socket.setblocking(False)
        self.server_address: tuple[str, int] = self.socket.getsockname()[:2]

    def share(self, shares: Shares) -> None:
        """Accept and count associations together with the processes forked after this call
        (:mod:`.shares`): each forked process calls ``shares.become(i)`` before serving."""
        self.shares = shares
        self.slots.shares = shares

    def connection_ended(self) -> None:
        with self._lock:
            self._connections -= 1
            if self.shares is not None:
                self.shares.set_connections(self._connections)
            self._ended.notify_all()

    def drain(self, timeout: float) -> int:
        """Wait until this process's connections have ended, ``timeout`` seconds at most (call
        after :meth:`shutdown`); returns how many are still open."""
        with self._ended:
            self._ended.wait_for(lambda: self._connections <= 0, timeout)
            return self._connections

    def refuse_connections(self) -> None:
        """Stop the listening socket listening, for every process holding it: a sender gets
        "connection refused" at once and tries again later, instead of waiting in the backlog
        of a socket no process accepts on any more (Linux; elsewhere each process's
        :meth:`shutdown` closes its own)."""
        try:
            self.socket.shutdown(socket.SHUT_RD)
        except OSError:
            pass

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Accept until :meth:`shutdown` (a select with a timeout: no busy loop, prompt stop). A
        pre-forked process holding more connections than another first leaves a pending one to
        it, for :data:`YIELD_ACCEPT_SECONDS` at most (:mod:`.shares`)."""
        yielding_since = 0.0
        trouble = _Trouble()
        while not (self._stop.is_set() or self._stop_requested):
            try:
                ready, _, _ = select.select([self.socket], [], [], poll_interval)
            except (OSError, ValueError) as err:
                if self._stop.is_set():
                    return
                # this thread is the only one accepting here: log, wait, try again
                trouble.report("waiting for connections failed", err)
                self._stop.wait(ACCEPT_BACKOFF_SECONDS)
                continue
            if not ready:
                yielding_since = 0.0
                continue
            if self.shares is not None and self.shares.yield_accept():
                now = time.monotonic()
                yielding_since = yielding_since or now
                if now - yielding_since < YIELD_ACCEPT_SECONDS:
                    self._stop.wait(0.001)
                    continue
            yielding_since = 0.0
            try:
                sock, address = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                continue  # another process took it
            except OSError as err:
                if self._stop.is_set() or err.errno == errno.EINVAL:  # no longer listening
                    return
                # Out of descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM): the connection
                # stays pending and select is ready again at once, so without a pause this loop
                # spun a core and wrote ~10,000 tracebacks a second.
                trouble.report("accepting a connection failed", err)
                self._stop.wait(ACCEPT_BACKOFF_SECONDS)
                continue
            trouble.clear()
            self._start(sock, address)

    def _start(self, sock: socket.socket, address: Any) -> None:
        host = str(address[0])
        if self.config.allowed_hosts and not _host_allowed(host, self.config.allowed_hosts):
            self.handler.refused_host(host)
            sock.close()
            return
        with self._lock:
            if self._connections >= self._max_connections:
                log.warning("closing a connection from %s: %d connections open", host, self._connections)
                sock.close()
                return
            self._connections += 1
            if self.shares is not None:
                self.shares.set_connections(self._connections)
        try:
            sock.setblocking(True)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.config.ssl_context is not None:
                # The handshake happens in the association's thread (do_handshake there), under
                # acse_timeout: a silent peer must not stall the accepting thread.
                sock = self.config.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            assoc = Association(self, sock, address)
            threading.Thread(target=assoc.run, name=f"dicom-assoc-{host}", daemon=True).start()
        except Exception:
            log.exception("could not start an association for %s", host)
            sock.close()
            self.connection_ended()

    def request_stop(self) -> None:
        """Make :meth:`serve_forever` return within its poll interval; the caller then calls
        :meth:`shutdown`. Safe in a signal handler: it only sets a flag. (:meth:`shutdown` sets
        an ``Event``, whose lock the handler's own thread may hold: inside ``Event.wait``, or
        inside the ``set`` of a first signal when a second lands, as a service manager's stop
        and the supervisor's both send one.)"""
        self._stop_requested = True

    def shutdown(self) -> None:
        """Stop accepting (running associations finish on their own threads)."""
        self._stop.set()
        try:
            self.socket.close()
        except OSError:
            pass


def _remove_staged(path: Path | None) -> None:
    """Remove a staging file, logging (not raising) a failure: the sender's answer and the
    association's slot must not depend on it (the next start discards what is left)."""
    if path is None:
        return
    try:
        path.unlink(missing_ok=True)
    except OSError as err:
        log.warning("could not remove the staging file %s: %s", path, err)


def _host_allowed(host: str, networks: tuple[Any, ...]) -> bool:
    import ipaddress

    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(ip in net for net in networks)

