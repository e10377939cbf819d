"""Retry or give up, per PACS answer, through the real outbox (issue: export statuses and TLS).

The peer is a real pynetdicom Storage SCP started in the test on a free loopback port, whose
C-STORE handler answers the status the test sets (PS3.4 Annex B.2.3), or a raw-socket peer that
answers A-ASSOCIATE-RJ with a chosen result/source/diagnostic (PS3.8 9.3.4, Table 9-21). Rows go
through :func:`enqueue_objects`, :func:`deliver` and the sweep's :func:`take_due`, on SQLite and
PostgreSQL. What is checked is the row: state, attempts, last error and status, and that a row
given up on is never sent again.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.engine import Engine
from sqlmodel import col, select, update

from audit.chain import AuditRecord, verify
from ground.clock import utcnow
from ground.db import session_scope
from integrations.dicom.destinations import Destination, ExportSettings
from integrations.dicom.export import deliver
from integrations.dicom.outbox import OutboxItem, OutboxObject, due_rows, enqueue_objects, take_due
from integrations.dicom.scu import Outcome, classify_rejection, classify_status
from tests.conftest import DICOM_DIR
from tests.factories.export_objects import sr_object
from tests.factories.tls import make_pki

SOURCE = DICOM_DIR / "ct" / "pydicom_CT_small.dcm"
PEER_AET = "STATUSPACS"


# -- the peers ---------------------------------------------------------------------------------

@dataclass
class StatusScp:
    """A pynetdicom Storage SCP whose C-STORE handler answers ``status`` (changeable mid-test)
    and records the SOP Instance UID of every data set it was sent."""

    port: int
    server: ThreadedAssociationServer
    ae: AE
    status: int = 0x0000
    seen: list[str] = field(default_factory=list)


def _handle_store(event: evt.Event, scp: list[StatusScp]) -> int:
    peer = scp[0]
    peer.seen.append(str(event.dataset.SOPInstanceUID))
    return peer.status


@pytest.fixture
def start_scp() -> Iterator[Callable[..., StatusScp]]:
    """Start a Storage SCP on 127.0.0.1, on a port the kernel picks; shut down after the test."""
    started: list[StatusScp] = []

    def start(status: int = 0x0000, *, ssl_context: ssl.SSLContext | None = None,
              require_calling_aet: list[str] | None = None, maximum_associations: int = 10) -> StatusScp:
        ae = AE(ae_title=PEER_AET)
        ae.supported_contexts = StoragePresentationContexts
        ae.add_supported_context(Verification)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
        ae.maximum_associations = maximum_associations
        if require_calling_aet:
            ae.require_calling_aet = require_calling_aet
        holder: list[StatusScp] = []
        server = ae.start_server(("127.0.0.1", 0), block=False, ssl_context=ssl_context,
                                 evt_handlers=[(evt.EVT_C_STORE, _handle_store, [holder])])
        assert server is not None
        scp = StatusScp(port=int(server.server_address[1]), server=server, ae=ae, status=status)
        holder.append(scp)
        started.append(scp)
        return scp

    yield start
    for scp in started:
        scp.ae.shutdown()


class RejectingPeer(threading.Thread):
    """A raw-socket peer that reads each A-ASSOCIATE-RQ and answers A-ASSOCIATE-RJ (PS3.8 9.3.4:
    PDU type 0x03, reserved, result, source, reason/diag), then closes."""

    def __init__(self, result: int, source: int, diagnostic: int) -> None:
        super().__init__(daemon=True)
        self.answer = struct.pack(">BBIBBBB", 0x03, 0x00, 4, 0x00, result, source, diagnostic)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.requests = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        self.sock.settimeout(0.1)  # a closed listening socket does not wake accept(): poll instead
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                header = conn.recv(6, socket.MSG_WAITALL)
                if len(header) < 6 or header[0] != 0x01:  # not an A-ASSOCIATE-RQ
                    continue
                (length,) = struct.unpack(">I", header[2:6])
                conn.recv(length, socket.MSG_WAITALL)
                self.requests += 1
                conn.sendall(self.answer)

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=5)
        self.sock.close()


# -- helpers -----------------------------------------------------------------------------------

def _settings(*dests: Destination) -> ExportSettings:
    """Short timeouts and a short backoff: a test waits fractions of a second, never minutes."""
    return ExportSettings.model_validate({"destinations": list(dests), "connect_timeout": 3, "acse_timeout": 3,
                                          "dimse_timeout": 5, "network_timeout": 5, "backoff_initial": 0.2})


def _dest(port: int, name: str = "pacs", ca_file: Path | None = None) -> Destination:
    """A destination on the loopback peer; with ``ca_file``, over TLS trusting that CA (the
    certificate names 127.0.0.1, so the host name check stays on)."""
    return Destination.model_validate({"name": name, "ae_title": PEER_AET, "host": "127.0.0.1", "port": port,
                                       "tls": None if ca_file is None else {"ca_file": ca_file}})


def _queue(engine: Engine, tmp_path: Path, settings: ExportSettings) -> tuple[int, OutboxObject]:
    obj = sr_object(SOURCE, tmp_path / "out" / "sr.dcm")
    study = str(dcmread(SOURCE, stop_before_pixels=True).StudyInstanceUID)
    with session_scope(engine) as s:
        [row_id] = enqueue_objects(s, draft_id="draft-1", study_instance_uid=study, objects=[obj],
                                   destinations=settings.destinations)
    return row_id, obj


def _row(engine: Engine, row_id: int) -> OutboxItem:
    with session_scope(engine) as s:
        row = s.get(OutboxItem, row_id)
        assert row is not None
        s.expunge(row)
        return row


def _sweep(engine: Engine) -> list[int]:
    """What the periodic sweep would dispatch now (lease and redispatch as in production)."""
    with session_scope(engine) as s:
        return take_due(s, lease_s=600, redispatch_after_s=60)


def _make_due(engine: Engine, row_id: int) -> None:
    """Skip the backoff: the retry is due now (the test does not wait out minutes)."""
    with session_scope(engine) as s:
        s.exec(update(OutboxItem).where(OutboxItem.id == row_id)  # type: ignore[arg-type]
               .values(next_attempt_at=utcnow() - timedelta(seconds=1)))


def _assert_never_retried(engine: Engine, settings: ExportSettings, row_id: int) -> None:
    """A dead row: the sweep does not pick it up, even long after, and a stray task does nothing."""
    _make_due(engine, row_id)  # even with its next_attempt_at long past
    assert _sweep(engine) == []
    with session_scope(engine) as s:
        assert due_rows(s, lease_s=0.001) == []
    assert deliver(engine, settings, [row_id]) == []
    row = _row(engine, row_id)
    assert row.state == "dead" and row.attempts == 1


def _audit_actions(engine: Engine) -> list[str]:
    with session_scope(engine) as s:
        assert verify(s).ok
        return [a.action for a in s.exec(select(AuditRecord).order_by(col(AuditRecord.seq))).all()]


# -- C-STORE statuses --------------------------------------------------------------------------

def test_out_of_resources_is_retried_and_delivered_once_the_pacs_recovers(
        engine: Engine, tmp_path: Path, start_scp: Callable[..., StatusScp]) -> None:
    scp = start_scp(0xA700)
    settings = _settings(_dest(scp.port))
    row_id, obj = _queue(engine, tmp_path, settings)

    [done] = deliver(engine, settings, [row_id])
    assert done.state.value == "failed"
    row = _row(engine, row_id)
    assert row.state == "failed" and row.attempts == 1 and row.last_status == 0xA700
    assert "C-STORE status 0xA700" in (row.last_error or "")
    assert row.next_attempt_at > row.updated_at  # a retry is scheduled, after the backoff
    assert scp.seen == [obj.sop_instance_uid]

    scp.status = 0x0000  # the PACS has room again
    time.sleep(0.3)  # backoff_initial is 0.2 s
    assert _sweep(engine) == [row_id]
    [done] = deliver(engine, settings, [row_id])
    assert done.state.value == "sent"
    row = _row(engine, row_id)
    assert row.state == "sent" and row.attempts == 2 and row.last_status == 0 and row.last_error is None
    assert scp.seen == [obj.sop_instance_uid] * 2  # the same SOP Instance UID both times
    actions = _audit_actions(engine)
    assert actions.count("export.attempt") == 2 and "export.failed" in actions and "export.sent" in actions


@pytest.mark.parametrize("status", [0xA900, 0xC000], ids=["A900-dataset-mismatch", "C000-cannot-understand"])
def test_refused_data_set_is_dead_after_one_attempt_and_never_retried(
        engine: Engine, tmp_path: Path, start_scp: Callable[..., StatusScp], status: int) -> None:
    scp = start_scp(status)
    settings = _settings(_dest(scp.port))
    row_id, obj = _queue(engine, tmp_path, settings)

    [done] = deliver(engine, settings, [row_id])
    assert done.state.value == "dead"
    row = _row(engine, row_id)
    assert row.state == "dead" and row.attempts == 1 and row.last_status == status
    assert f"C-STORE status 0x{status:04X}" in (row.last_error or "")
    _assert_never_retried(engine, settings, row_id)
    assert scp.seen == [obj.sop_instance_uid]  # sent exactly once
    actions = _audit_actions(engine)
    assert actions.count("export.attempt") == 1 and actions.count("export.dead") == 1


# -- association rejections --------------------------------------------------------------------

def test_association_limit_reached_is_retried_and_delivered_once_a_slot_frees(
        engine: Engine, tmp_path: Path, start_scp: Callable[..., StatusScp]) -> None:
    """pynetdicom rejects past ``maximum_associations`` with result 2 (rejected-transient),
    source 3, diagnostic 2 (local limit exceeded)."""
    scp = start_scp(maximum_associations=1)
    other = AE(ae_title="OTHER")
    other.add_requested_context(Verification)
    held = other.associate("127.0.0.1", scp.port, ae_title=PEER_AET)
    try:
        assert held.is_established
        settings = _settings(_dest(scp.port))
        row_id, obj = _queue(engine, tmp_path, settings)
        [done] = deliver(engine, settings, [row_id])
        assert done.state.value == "failed"
        row = _row(engine, row_id)
        assert row.state == "failed" and row.attempts == 1 and row.last_status is None
        assert "association rejected (transient): local limit exceeded" in (row.last_error or ""), row.last_error
        assert scp.seen == []
    finally:
        if held.is_established:
            held.release()
    deadline = time.monotonic() + 5  # the SCP's acceptor thread ends just after the release
    while any(a.is_acceptor for a in scp.ae.active_associations) and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # the backoff
    assert _sweep(engine) == [row_id]
    [done] = deliver(engine, settings, [row_id])
    assert done.state.value == "sent"
    row = _row(engine, row_id)
    assert row.state == "sent" and row.attempts == 2
    assert scp.seen == [obj.sop_instance_uid]


def test_unknown_calling_ae_is_dead_at_once_and_never_retried(
        engine: Engine, tmp_path: Path, start_scp: Callable[..., StatusScp]) -> None:
    """pynetdicom's ``require_calling_aet``: result 1 (rejected-permanent), source 1, diagnostic 3."""
    scp = start_scp(require_calling_aet=["SOMEONE"])
    settings = _settings(_dest(scp.port))
    row_id, _ = _queue(engine, tmp_path, settings)
    [done] = deliver(engine, settings, [row_id])
    assert done.state.value == "dead"
    row = _row(engine, row_id)
    assert row.attempts == 1
    assert "association rejected (permanent): calling AE title not recognised" in (row.last_error or "")
    assert "we called as TAQRIR" in (row.last_error or "")
    _assert_never_retried(engine, settings, row_id)
    assert scp.seen == []


@pytest.mark.parametrize(("result", "source", "diagnostic", "state", "reason"), [
    (2, 1, 1, "failed", "association rejected (transient): no reason given"),
    (2, 3, 1, "failed", "association rejected (transient): temporary congestion"),
    (1, 1, 7, "dead", "association rejected (permanent): called AE title not recognised"),
    (1, 2, 2, "dead", "association rejected (permanent): protocol version not supported"),
], ids=["transient-user", "transient-congestion", "permanent-called-ae", "permanent-protocol"])
def test_raw_association_reject_is_classified_on_the_row(
        engine: Engine, tmp_path: Path, result: int, source: int, diagnostic: int, state: str, reason: str) -> None:
    with _delivered_to_rejecting_peer(engine, tmp_path, result, source, diagnostic) as (peer, settings, row_id, done):
        row = _row(engine, row_id)
        assert done.state.value == state and row.state == state and row.attempts == 1
        assert reason in (row.last_error or ""), row.last_error
        assert peer.requests == 1
        if state == "dead":
            _assert_never_retried(engine, settings, row_id)
        else:
            time.sleep(0.3)
            assert _sweep(engine) == [row_id]
        assert peer.requests == 1


@contextlib.contextmanager
def _delivered_to_rejecting_peer(engine: Engine, tmp_path: Path, result: int, source: int,
                                 diagnostic: int) -> Iterator[tuple[RejectingPeer, ExportSettings, int, Any]]:
    """One object queued for a peer that answers A-ASSOCIATE-RJ, delivered once: (the peer, the
    settings, the row's id, the delivery's outcome); the peer stops afterwards."""
    peer = RejectingPeer(result, source, diagnostic)
    peer.start()
    try:
        settings = _settings(_dest(peer.port))
        row_id, _ = _queue(engine, tmp_path, settings)
        [done] = deliver(engine, settings, [row_id])
        yield peer, settings, row_id, done
    finally:
        peer.stop()


def test_a_rejection_whose_transport_closed_first_is_still_a_rejection(
        engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pynetdicom's reactor may handle the A-ASSOCIATE-RJ and close the transport before the
    requesting thread looks (about one association in a hundred against a peer that closes at
    once): forced here by holding the requesting thread back after its request. The rejection is
    still read and classified, not taken for a peer that never answered."""
    from pynetdicom.acse import ACSE

    send_request = ACSE.send_request

    def send_then_dawdle(self: ACSE) -> None:
        send_request(self)
        time.sleep(0.3)  # the reactor receives the RJ and closes the socket meanwhile

    monkeypatch.setattr(ACSE, "send_request", send_then_dawdle)
    with _delivered_to_rejecting_peer(engine, tmp_path, 1, 2, 2) as (_, _, row_id, done):
        row = _row(engine, row_id)
        assert done.state.value == "dead" and row.state == "dead", row.last_error
        assert "association rejected (permanent): protocol version not supported" in (row.last_error or "")


# -- TLS ---------------------------------------------------------------------------------------

def _server_context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


def test_tls_destination_is_delivered_and_a_wrong_ca_is_dead_with_the_reason(
        engine: Engine, tmp_path: Path, start_scp: Callable[..., StatusScp]) -> None:
    pki = make_pki(tmp_path / "pki")
    scp = start_scp(ssl_context=_server_context(pki.server_cert, pki.server_key))
    obj = sr_object(SOURCE, tmp_path / "out" / "sr.dcm")
    # A destination that trusts another CA: the handshake fails, the row is dead with why (the
    # same certificate fails every later attempt; `taqrir outbox retry` replays it once fixed).
    wrong = _dest(scp.port, "wrong-ca", ca_file=pki.other_ca)
    right = _dest(scp.port, ca_file=pki.ca)
    assert right.tls is not None and right.tls.check_hostname
    settings = _settings(wrong, right)
    with session_scope(engine) as s:
        [wrong_id, right_id] = enqueue_objects(s, draft_id="draft-1", study_instance_uid="1.2.3", objects=[obj],
                                               destinations=[wrong, right])

    t0 = time.monotonic()
    [failed] = deliver(engine, settings, [wrong_id])
    assert time.monotonic() - t0 < 3, "a failed handshake waited for a timeout"
    row = _row(engine, wrong_id)
    assert failed.state.value == row.state == "dead" and row.attempts == 1
    assert "TLS handshake with STATUSPACS@127.0.0.1" in (row.last_error or ""), row.last_error
    assert "certificate verify failed" in (row.last_error or "")
    assert scp.seen == []  # nothing reached the SCP over the failed handshake

    [done] = deliver(engine, settings, [right_id])  # and the SCP still serves peers that trust it
    row = _row(engine, right_id)
    assert done.state.value == row.state == "sent" and row.attempts == 1, row.last_error
    assert scp.seen == [obj.sop_instance_uid]


# -- the pure classification -------------------------------------------------------------------

@pytest.mark.parametrize(("status", "outcome"), [
    (0x0000, Outcome.success),
    (0xB000, Outcome.warning),    # B.2.3 coercion of data elements: stored
    (0xB007, Outcome.warning),    # data set does not match SOP class (warning): stored
    (0xB006, Outcome.warning),    # elements discarded: stored
    (0xA700, Outcome.transient),  # B.2.3 refused: out of resources
    (0xA7FF, Outcome.transient),  # the whole A7xx range
    (0xA701, Outcome.transient),
    (0x0110, Outcome.transient),  # PS3.7 C: processing failure
    (0x0213, Outcome.transient),  # PS3.7 C: resource limitation
    (0xA900, Outcome.permanent),  # B.2.3 error: data set does not match SOP class
    (0xA9FF, Outcome.permanent),
    (0xC000, Outcome.permanent),  # B.2.3 error: cannot understand
    (0xCFFF, Outcome.permanent),
    (0xC210, Outcome.permanent),
    (0x0122, Outcome.permanent),  # PS3.7 C: SOP class not supported
    (0x0124, Outcome.permanent),  # PS3.7 C: not authorised
    (0x0211, Outcome.permanent),  # PS3.7 C: unrecognised operation
    (0xFE00, Outcome.permanent),  # cancel: not a stored answer, never looped on
    (0x1234, Outcome.permanent),  # unknown: never retried on its own
], ids=lambda v: f"0x{v:04X}" if isinstance(v, int) else str(v))
def test_classify_status(status: int, outcome: Outcome) -> None:
    assert classify_status(status) is outcome


@pytest.mark.parametrize(("result", "source", "diagnostic", "outcome", "reason"), [
    # PS3.8 Table 9-21: result 1 rejected-permanent, 2 rejected-transient
    (1, 1, 1, Outcome.permanent, "no reason given"),
    (1, 1, 2, Outcome.permanent, "application context name not supported"),
    (1, 1, 3, Outcome.permanent, "calling AE title not recognised"),
    (1, 1, 7, Outcome.permanent, "called AE title not recognised"),
    (1, 2, 2, Outcome.permanent, "protocol version not supported"),
    (1, 3, 1, Outcome.permanent, "temporary congestion"),  # the result field decides
    (2, 1, 1, Outcome.transient, "no reason given"),
    (2, 1, 3, Outcome.transient, "calling AE title not recognised"),
    (2, 2, 1, Outcome.transient, "no reason given"),
    (2, 3, 1, Outcome.transient, "temporary congestion"),
    (2, 3, 2, Outcome.transient, "local limit exceeded"),  # pynetdicom's maximum_associations
    (2, 9, 9, Outcome.transient, "source 9 diagnostic 9"),  # an unknown reason is still named
])
def test_classify_rejection(result: int, source: int, diagnostic: int, outcome: Outcome, reason: str) -> None:
    got, text = classify_rejection(result, source, diagnostic)
    assert got is outcome
    kind = "permanent" if outcome is Outcome.permanent else "transient"
    assert text == f"association rejected ({kind}): {reason}"
