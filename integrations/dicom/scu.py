"""C-STORE SCU and Storage Commitment SCU towards a PACS (pynetdicom), and what each failure means.

:func:`classify_status` and :func:`classify_rejection` are pure: they decide, from the standard's
codes, whether a failure can succeed later (PS3.4 Annex B.2.3 statuses: 0xA7xx "Out of
resources"; PS3.8 9.3.4 A-ASSOCIATE-RJ result 2 "rejected-transient") or never will (result 1
"rejected-permanent", calling AE title not recognised, 0xA9xx "Data set does not match SOP
class", 0xCxxx "Cannot understand"). A refused connection and a timeout are transient: the PACS
may be restarting. :func:`send_files` does the network part and raises
:class:`TransientExportError` or :class:`PermanentExportError`, so that the outbox never loops on a
refusal.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]

from ground.errors import PermanentError, TaqrirError, TransientError

from .destinations import Destination, ExportSettings

log = logging.getLogger(__name__)


class ExportError(TaqrirError):
    """Sending an object to a destination failed; ``status`` is the DIMSE status when one came."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class TransientExportError(ExportError, TransientError):
    """The destination may take it later (down, busy, out of resources): retry with backoff."""


class PermanentExportError(ExportError, PermanentError):
    """The destination refuses it for good (our AE unknown, SOP class unsupported, data rejected):
    dead at once; a person fixes the PACS or Taqrir's settings, then `taqrir outbox retry`."""


class Outcome(StrEnum):
    success = "success"
    warning = "warning"
    transient = "transient"
    permanent = "permanent"


#: PS3.4 B.2.3 and GG.4: warnings still mean "stored".
_WARNINGS = {0x0001, 0x0107, 0x0116, 0xB000, 0xB006, 0xB007}
#: PS3.7 C: processing failure, duplicate invocation, resource limitation: may succeed later.
_TRANSIENT_GENERAL = {0x0110, 0x0210, 0x0213}


def classify_status(status: int) -> Outcome:
    """What a C-STORE response status means for the outbox."""
    if status == 0x0000:
        return Outcome.success
    if status in _WARNINGS:
        return Outcome.warning
    if (status & 0xFF00) == 0xA700 or status in _TRANSIENT_GENERAL:
        return Outcome.transient
    # 0xA9xx, 0xCxxx, 0x0122 SOP class not supported, 0x0124 not authorised, and anything
    # unknown: never retried on its own (a loop on a refusal blocks nothing, but helps nobody).
    return Outcome.permanent


#: PS3.8 Table 9-21: A-ASSOCIATE-RJ reasons by (source, diagnostic).
_REJECT_REASONS = {
    (1, 1): "no reason given", (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognised", (1, 7): "called AE title not recognised",
    (2, 1): "no reason given", (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion", (3, 2): "local limit exceeded",
}


def _rejection(assoc: Association) -> Any | None:
    """The peer's A-ASSOCIATE-RJ, when it sent one. pynetdicom (3.0) reports a rejection as an
    abort, with no answer, when its reactor has already handled the RJ and closed the transport
    before the requesting thread checks the connection (a peer that closes right after
    rejecting, as Orthanc does, wins that race about one time in a hundred here); the RJ is
    then still queued for the requestor, and is read from there."""
    if assoc.is_rejected:
        return assoc.acceptor.primitive or A_ASSOCIATE()  # (no result read: classified permanent)
    queued = assoc.dul.peek_next_pdu()
    if isinstance(queued, A_ASSOCIATE) and getattr(queued, "result", None) in (0x01, 0x02):
        return queued
    return None


def classify_rejection(result: int, source: int, diagnostic: int) -> tuple[Outcome, str]:
    """An A-ASSOCIATE-RJ as (outcome, reason). Result 2 (transient) and the service provider's
    congestion/limit reasons retry; result 1 (permanent) does not."""
    reason = _REJECT_REASONS.get((source, diagnostic), f"source {source} diagnostic {diagnostic}")
    kind = "permanent" if result == 1 else "transient"
    text = f"association rejected ({kind}): {reason}"
    if result == 2 or (source == 3 and result != 1):
        return Outcome.transient, text
    return Outcome.permanent, text


@dataclass(frozen=True)
class SendItem:
    """One Part 10 file to send."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str


@dataclass(frozen=True)
class SendResult:
    """What the PACS answered for one item: a stored status, or the error for that item alone."""

    item: SendItem
    status: int | None
    comment: str = ""
    error: ExportError | None = None


@dataclass(frozen=True)
class CommitmentRequest:
    """An N-ACTION that was accepted: results arrive later in an N-EVENT-REPORT."""

    transaction_uid: str
    status: int


def _ssl_context(dest: Destination) -> tuple[ssl.SSLContext, str] | None:
    if dest.tls is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                     cafile=str(dest.tls.ca_file) if dest.tls.ca_file else None)
    ctx.check_hostname = dest.tls.check_hostname
    if dest.tls.cert_file and dest.tls.key_file:
        ctx.load_cert_chain(str(dest.tls.cert_file), str(dest.tls.key_file))
    return ctx, dest.host


def _keep_handshake_error(ctx: ssl.SSLContext, errors: list[ssl.SSLError]) -> None:
    """Collect a failed TLS handshake into ``errors``. pynetdicom catches it in
    ``AssociationSocket.connect``, only logs it, and reports no association at all, so without
    this an unknown CA or a misnamed certificate was recorded as "refused, or no association
    answer": the outbox row must say the real cause (found by tests/integrations/dicom/
    test_export_statuses.py)."""

    class _Recording(ssl.SSLSocket):
        def connect(self, addr: Any) -> None:
            try:
                super().connect(addr)
            except ssl.SSLError as err:
                errors.append(err)
                raise

    ctx.sslsocket_class = _Recording


def _transfer_syntax(path: Path) -> str:
    try:
        meta = dcmread(path, stop_before_pixels=True, specific_tags=[(0x0002, 0x0010)])
    except (OSError, ValueError) as err:
        raise PermanentExportError(f"{path.name} cannot be read as DICOM ({type(err).__name__}): rebuild the draft's "
                                   "objects (`taqrir redraft`)") from err
    ts = getattr(meta.file_meta, "TransferSyntaxUID", None)
    return str(ts) if ts else str(ExplicitVRLittleEndian)


def _no_delay(event: evt.Event) -> None:
    """TCP_NODELAY on our end: pynetdicom leaves Nagle's algorithm on, and a C-STORE's last small
    PDU then waits for the peer's delayed ACK (~40 ms per object; measured in bench/export.py)."""
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def associate(dest: Destination, settings: ExportSettings, items: Sequence[SendItem], *,
              commitment: bool = False) -> Association:
    """Open an association to ``dest`` proposing what ``items`` need. Raises the classified error
    when it cannot be opened."""
    ae = AE(ae_title=settings.calling_ae(dest))
    ae.connection_timeout = settings.connect_timeout
    ae.acse_timeout = settings.acse_timeout
    ae.dimse_timeout = settings.dimse_timeout
    ae.network_timeout = settings.network_timeout
    contexts: dict[str, list[str]] = {}
    for item in items:
        ts = contexts.setdefault(item.sop_class_uid, [])
        for syntax in (_transfer_syntax(item.path), str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)):
            if syntax not in ts:
                ts.append(syntax)
    for sop_class, syntaxes in contexts.items():
        ae.add_requested_context(sop_class, syntaxes)
    if commitment:
        ae.add_requested_context(StorageCommitmentPushModel)
    tls = _ssl_context(dest)
    tls_errors: list[ssl.SSLError] = []
    if tls is not None:
        _keep_handshake_error(tls[0], tls_errors)
    try:
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls,
                             evt_handlers=[(evt.EVT_CONN_OPEN, _no_delay)])
    except (OSError, ssl.SSLError) as err:
        raise TransientExportError(f"cannot reach {dest.host}:{dest.port}: {type(err).__name__}: {err}") from err
    if assoc.is_established:
        return assoc
    rsp = _rejection(assoc)
    if rsp is not None:
        result = int(getattr(rsp, "result", 1) or 1)
        source = int(getattr(rsp, "result_source", 0) or 0)
        diagnostic = int(getattr(rsp, "diagnostic", 0) or 0)
        outcome, reason = classify_rejection(result, source, diagnostic)
        reason = f"{dest.ae_title}@{dest.host}:{dest.port} {reason} (we called as {settings.calling_ae(dest)})"
        if outcome is Outcome.permanent:
            raise PermanentExportError(reason)
        raise TransientExportError(reason)
    if tls_errors:
        reason = (f"TLS handshake with {dest.ae_title}@{dest.host}:{dest.port} failed: {tls_errors[0]}; check the "
                  f"destination's tls.ca_file (and cert_file) against the PACS's certificate")
        # A certificate that fails verification fails every later attempt the same way (as the
        # ATNA sender holds too): dead at once, replayed by `taqrir outbox retry` once the CA file
        # or the PACS's certificate is fixed. Any other handshake failure (a reset mid-handshake)
        # may pass next time.
        if isinstance(tls_errors[0], ssl.SSLCertVerificationError):
            raise PermanentExportError(reason)
        raise TransientExportError(reason)
    if assoc.acceptor.primitive is None:  # no answer at all: TCP refused, or silence until the ACSE timeout
        raise TransientExportError(f"cannot connect to {dest.ae_title}@{dest.host}:{dest.port} (refused, or no "
                                   f"association answer within {settings.connect_timeout:g}+"
                                   f"{settings.acse_timeout:g}s)")
    if assoc.is_aborted:
        if not assoc.accepted_contexts and assoc.rejected_contexts:
            raise PermanentExportError(f"{dest.ae_title}@{dest.host}:{dest.port} accepts none of the SOP classes "
                                       f"{sorted(contexts)}: configure it to store them, or drop the kind from "
                                       f"the destination")
        raise TransientExportError(f"{dest.ae_title}@{dest.host}:{dest.port} aborted the association")
    raise TransientExportError(f"cannot connect to {dest.host}:{dest.port} (refused or timed out after "
                               f"{settings.connect_timeout:g}s)")


def send_files(dest: Destination, settings: ExportSettings, items: Sequence[SendItem]) -> list[SendResult]:
    """C-STORE every item over one association. An association-level failure raises (it concerns
    every item); a per-item failure is returned in that item's :class:`SendResult`."""
    assoc = associate(dest, settings, items)
    results: list[SendResult] = []
    try:
        for item in items:
            results.append(_store_one(assoc, dest, item))
            if not assoc.is_established:
                break
    finally:
        if assoc.is_established:
            assoc.release()
    for item in items[len(results):]:
        results.append(SendResult(item, None, error=TransientExportError(
            f"{dest.ae_title} dropped the association before this object was sent")))
    return results


def _store_one(assoc: Association, dest: Destination, item: SendItem) -> SendResult:
    try:
        rsp = assoc.send_c_store(item.path)
    except ValueError as err:  # no accepted presentation context for this SOP class / syntax
        return SendResult(item, None, error=PermanentExportError(
            f"{dest.ae_title} did not accept SOP class {item.sop_class_uid} ({err})"))
    except (OSError, RuntimeError) as err:
        return SendResult(item, None, error=TransientExportError(f"sending failed: {type(err).__name__}: {err}"))
    status = getattr(rsp, "Status", None) if rsp is not None else None
    if status is None:
        return SendResult(item, None, error=TransientExportError(
            f"no C-STORE response from {dest.ae_title} (DIMSE timeout or association dropped)"))
    status = int(status)
    comment = str(getattr(rsp, "ErrorComment", "") or "")
    outcome = classify_status(status)
    if outcome in (Outcome.success, Outcome.warning):
        return SendResult(item, status, comment)
    text = f"{dest.ae_title} answered C-STORE status 0x{status:04X}" + (f": {comment}" if comment else "")
    failure = (TransientExportError if outcome is Outcome.transient else PermanentExportError)(text, status)
    return SendResult(item, status, comment, error=failure)


def new_transaction_uid() -> str:
    """A Storage Commitment Transaction UID: 2.25 + a UUID (PS3.5 B.2), unique and ours."""
    return str(generate_uid(prefix=None))


def request_commitment(dest: Destination, settings: ExportSettings, items: Sequence[SendItem],
                       transaction_uid: str) -> CommitmentRequest:
    """Storage Commitment Push Model N-ACTION (PS3.4 J.3.2) for ``items``; the PACS answers later
    with an N-EVENT-REPORT, usually on an association it opens to our listener."""
    assoc = associate(dest, settings, [], commitment=True)
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    refs = []
    for item in items:
        ref = Dataset()
        ref.ReferencedSOPClassUID = UID(item.sop_class_uid)
        ref.ReferencedSOPInstanceUID = UID(item.sop_instance_uid)
        refs.append(ref)
    ds.ReferencedSOPSequence = refs
    try:
        status_ds, _reply = assoc.send_n_action(ds, 1, StorageCommitmentPushModel, "1.2.840.10008.1.20.1.1")
    except ValueError as err:
        raise PermanentExportError(f"{dest.ae_title} does not support Storage Commitment: {err}") from err
    finally:
        if assoc.is_established:
            assoc.release()
    status = int(getattr(status_ds, "Status", 0xFFFF)) if status_ds is not None else None
    if status is None:
        raise TransientExportError(f"no N-ACTION response from {dest.ae_title}")
    if status != 0x0000:
        raise PermanentExportError(f"{dest.ae_title} refused the Storage Commitment request: 0x{status:04X}", status)
    return CommitmentRequest(transaction_uid, status)


__all__ = [
    "CommitmentRequest", "ExportError", "Outcome", "PermanentExportError", "SendItem", "SendResult",
    "TransientExportError", "associate", "classify_rejection", "classify_status", "new_transaction_uid", "request_commitment",
    "send_files",
]
