"""The Storage SCP's own wire code: DIMSE command sets and file meta against pydicom/pynetdicom,
and the Upper Layer protocol against raw peers that do what real senders rarely do."""

from __future__ import annotations

import io
import json
import socket
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.dsutils import decode, encode
from pynetdicom.pdu import A_ASSOCIATE_AC
from pynetdicom.pdu_primitives import (
    SCP_SCU_RoleSelectionNegotiation,
)
from sqlmodel import select

from audit.chain import AuditRecord
from ground.db import session_scope
from integrations.dicom import dimse
from integrations.dicom.listener import Listener
from tests.factories.dcmtk import echoscu, storescu
from tests.factories.raw_peer import associate_rq, dimse_command, p_data, read_pdu

CORPUS = Path(__file__).resolve().parents[2] / "data" / "dicom"
CT = CORPUS / "ct" / "pydicom_CT_small.dcm"
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
FIND = "1.2.840.10008.5.1.4.1.2.2.1"  # Study Root Query/Retrieve - FIND
COMMITMENT = "1.2.840.10008.1.20.1"  # Storage Commitment Push Model


# ---------------------------------------------------------------------------------------------
# pure codecs


def test_response_command_set_is_what_pydicom_decodes() -> None:
    raw = dimse.encode_response(dimse.C_STORE_RSP, 7, 0xC210, sop_class_uid=CT_STORAGE,
                                sop_instance_uid="1.2.3.4.5", error_comment="cannot understand")
    ds = decode(io.BytesIO(raw), True, True)
    assert ds.CommandGroupLength == len(raw) - 12
    assert (ds.CommandField, ds.MessageIDBeingRespondedTo, ds.Status) == (0x8001, 7, 0xC210)
    assert ds.CommandDataSetType == 0x0101
    assert (ds.AffectedSOPClassUID, ds.AffectedSOPInstanceUID) == (CT_STORAGE, "1.2.3.4.5")
    assert ds.ErrorComment == "cannot understand"
    tags = [int(e.tag) for e in ds]
    assert tags == sorted(tags)


def test_request_command_set_from_pydicom_is_decoded() -> None:
    cmd = Dataset()
    cmd.AffectedSOPClassUID = CT_STORAGE
    cmd.CommandField = 0x0001
    cmd.MessageID = 42
    cmd.Priority = 0
    cmd.CommandDataSetType = 0x0000
    cmd.AffectedSOPInstanceUID = "1.2.3.4.5.6"
    cmd.MoveOriginatorApplicationEntityTitle = "MOVER"
    body = encode(cmd, True, True)
    assert body is not None
    raw = struct.pack("<HHLL", 0, 0, 4, len(body)) + body
    got = dimse.decode_command(raw)
    assert got == dimse.Command(0x0001, 42, True, CT_STORAGE, "1.2.3.4.5.6", "MOVER")


@pytest.mark.parametrize("raw, problem", [
    (b"\x00\x00\x00\x01", "ends inside an element header"),
    (struct.pack("<HHL", 8, 0x18, 2) + b"ab", "outside group 0000"),
    (struct.pack("<HHL", 0, 0x100, 200) + b"ab", "longer than the command set"),
    (struct.pack("<HHL", 0, 0x100, 2) + b"\x01\x00", "(0000,0110) is missing"),
])
def test_bad_command_sets_are_refused(raw: bytes, problem: str) -> None:
    with pytest.raises(dimse.CommandError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        dimse.decode_command(raw)


def test_file_meta_reads_back_with_pydicom() -> None:
    dataset = CT.read_bytes()
    start = 132 + 12 + struct.unpack("<L", dataset[140:144])[0]
    meta = dimse.file_meta(sop_class_uid=CT_STORAGE, sop_instance_uid="1.2.3.45", transfer_syntax_uid=EXPLICIT_LE,
                           implementation_class_uid="2.25.1", implementation_version="TAQRIR_1", source_ae="CT01")
    ds = dcmread(io.BytesIO(meta + dataset[start:]))
    fm = ds.file_meta
    assert (fm.MediaStorageSOPClassUID, fm.MediaStorageSOPInstanceUID, fm.TransferSyntaxUID) == (
        CT_STORAGE, "1.2.3.45", EXPLICIT_LE)
    assert (fm.ImplementationClassUID, fm.ImplementationVersionName, fm.SourceApplicationEntityTitle) == (
        "2.25.1", "TAQRIR_1", "CT01")
    assert fm.FileMetaInformationGroupLength == len(meta) - 132 - 12
    assert ds.Rows == 128


# ---------------------------------------------------------------------------------------------
# raw peers


@pytest.fixture
def peer(start_listener: Callable[..., Listener]) -> Callable[..., tuple[socket.socket, A_ASSOCIATE_AC | int, Listener]]:
    def _open(rq: bytes | None = None, **listener_overrides: object) -> tuple[socket.socket, A_ASSOCIATE_AC | int, Listener]:
        listener = start_listener(**listener_overrides)
        sock = socket.create_connection(("127.0.0.1", listener.port), timeout=10)  # type: ignore[attr-defined]
        sock.sendall(rq or associate_rq(contexts=[(1, CT_STORAGE, EXPLICIT_LE), (3, FIND, EXPLICIT_LE)]))
        pdu_type, raw = read_pdu(sock)
        if pdu_type != 0x02:
            return sock, pdu_type, listener
        ac = A_ASSOCIATE_AC()
        ac.decode(raw)
        return sock, ac, listener
    return _open


def _still_serving(listener: Listener) -> None:
    assert echoscu(listener.port).returncode == 0  # type: ignore[attr-defined]


def test_negotiation_accepts_storage_rejects_other_services_and_replies_roles(peer: Callable[..., tuple]) -> None:
    rq = associate_rq(contexts=[(1, CT_STORAGE, EXPLICIT_LE), (3, FIND, EXPLICIT_LE)],
                       roles=[(CT_STORAGE, True, False)])
    sock, ac, listener = peer(rq)
    prim = ac.to_primitive()
    results = {cx.context_id: cx.result for cx in prim.presentation_context_definition_results_list}
    assert results == {1: 0x00, 3: 0x03}  # FIND: abstract syntax not supported
    roles = [i for i in prim.user_information if isinstance(i, SCP_SCU_RoleSelectionNegotiation)]
    assert [(str(r.sop_class_uid), r.scu_role, r.scp_role) for r in roles] == [(CT_STORAGE, True, False)]
    sock.sendall(struct.pack(">BBL", 0x05, 0, 4) + b"\0\0\0\0")
    assert read_pdu(sock)[0] == 0x06  # A-RELEASE-RP
    sock.close()
    _still_serving(listener)


def test_wrong_application_context_is_rejected(peer: Callable[..., tuple]) -> None:
    sock, result, listener = peer(associate_rq(contexts=[(1, CT_STORAGE, EXPLICIT_LE)], app_context="1.2.3"))
    assert result == 0x03  # A-ASSOCIATE-RJ
    sock.close()
    _still_serving(listener)


def test_association_limit_rejects_transiently(peer: Callable[..., tuple]) -> None:
    sock, ac, listener = peer(max_associations=1)
    assert isinstance(ac, A_ASSOCIATE_AC)
    second = socket.create_connection(("127.0.0.1", listener.port), timeout=10)  # type: ignore[attr-defined]
    second.sendall(associate_rq(contexts=[(1, CT_STORAGE, EXPLICIT_LE)]))
    pdu_type, raw = read_pdu(second)
    assert (pdu_type, raw[7:10]) == (0x03, bytes((0x02, 0x03, 0x02)))  # transient, local limit exceeded
    second.close()
    sock.close()


def test_responses_are_fragmented_to_a_tiny_peer_pdu(peer: Callable[..., tuple]) -> None:
    sock, _ac, _listener = peer(associate_rq(contexts=[(1, CT_STORAGE, EXPLICIT_LE)], max_pdu=32))
    data = CT.read_bytes()
    dataset = data[132 + 12 + struct.unpack("<L", data[140:144])[0]:]
    sop = dcmread(CT, stop_before_pixels=True).SOPInstanceUID
    sock.sendall(p_data(1, 0x03, dimse_command(0x0001, 5, has_dataset=True, sop_instance=sop)))
    for start in range(0, len(dataset), 4000):
        last = start + 4000 >= len(dataset)
        sock.sendall(p_data(1, 0x02 if last else 0x00, dataset[start:start + 4000]))
    command, pdus = b"", 0
    while True:
        pdu_type, raw = read_pdu(sock)
        assert pdu_type == 0x04 and len(raw) - 6 <= 32
        pdus += 1
        command += raw[12:]
        if raw[11] & 0x02:
            break
    assert pdus > 1
    rsp = decode(io.BytesIO(command), True, True)
    assert (rsp.CommandField, rsp.MessageIDBeingRespondedTo, rsp.Status) == (0x8001, 5, 0x0000)
    assert rsp.AffectedSOPInstanceUID == sop
    sock.close()


@pytest.mark.parametrize("which, has_dataset", [("instance", True), ("instance", False), ("class", True)])
def test_a_command_whose_uid_is_not_ascii_gets_0117_is_audited_and_the_association_goes_on(
        peer: Callable[..., tuple], which: str, has_dataset: bool) -> None:
    """A byte outside ASCII in a C-STORE's Affected SOP Instance (or Class) UID made the
    answer's encoding raise: the association was aborted as an internal failure and logged as a
    bug. It is now refused with 0x0117 (invalid SOP instance, PS3.7 C.4.2), audited as every
    refusal is, and the same association stores the next instance."""
    sock, _ac, listener = peer(associate_rq(contexts=[(1, CT_STORAGE, EXPLICIT_LE)]))
    data = CT.read_bytes()
    dataset = data[132 + 12 + struct.unpack("<L", data[140:144])[0]:]
    good, bad = ((b"1.2.3.4.5\x00", b"1.2.\xe93.4.5") if which == "instance"
                 else (CT_STORAGE.encode() + b"\x00", CT_STORAGE[:-1].encode() + b"\xe92"))
    command = dimse_command(0x0001, 1, has_dataset=has_dataset, sop_instance="1.2.3.4.5")
    assert good in command and len(good) == len(bad)
    sock.sendall(p_data(1, 0x03, command.replace(good, bad)))
    if has_dataset:
        sock.sendall(p_data(1, 0x02, dataset))
    pdu_type, raw = read_pdu(sock)
    assert pdu_type == 0x04
    rsp = decode(io.BytesIO(raw[12:]), True, True)
    assert (rsp.CommandField, rsp.MessageIDBeingRespondedTo, rsp.Status) == (0x8001, 1, 0x0117)
    assert rsp.ErrorComment == f"Affected SOP {which.title()} UID is not a valid UID"
    assert rsp.AffectedSOPClassUID == CT_STORAGE  # the context's, when the command's is no UID
    assert ("AffectedSOPInstanceUID" in rsp) is (which == "class")
    sop = dcmread(CT, stop_before_pixels=True).SOPInstanceUID
    sock.sendall(p_data(1, 0x03, dimse_command(0x0001, 2, has_dataset=True, sop_instance=sop)))
    sock.sendall(p_data(1, 0x02, dataset))
    _pdu_type, raw = read_pdu(sock)
    rsp = decode(io.BytesIO(raw[12:]), True, True)
    assert (rsp.MessageIDBeingRespondedTo, rsp.Status, rsp.AffectedSOPInstanceUID) == (2, 0x0000, sop)
    sock.close()
    assert not any(listener.storage.tmp_dir.iterdir())
    with session_scope(listener.engine) as s:
        (audited,) = s.exec(select(AuditRecord).where(AuditRecord.action == "instance.rejected")).all()
    details = json.loads(audited.details)
    assert details["status"] == "0x0117" and "\\xe9" in details["reason"]  # the byte as sent


def test_a_commitment_report_without_a_dataset_gets_a_report_answer(peer: Callable[..., tuple]) -> None:
    """An N-EVENT-REPORT (Storage Commitment) without its Event Information was answered with a
    C-STORE-RSP; it now gets an N-EVENT-REPORT-RSP (processing failure)."""
    sock, _ac, listener = peer(associate_rq(contexts=[(1, CT_STORAGE, EXPLICIT_LE), (5, COMMITMENT, EXPLICIT_LE)]))
    cmd = Dataset()
    cmd.AffectedSOPClassUID = COMMITMENT
    cmd.CommandField = 0x0100
    cmd.MessageID = 3
    cmd.CommandDataSetType = 0x0101
    cmd.AffectedSOPInstanceUID = "1.2.840.10008.1.20.1.1"
    cmd.EventTypeID = 1
    body = encode(cmd, True, True)
    assert body is not None
    sock.sendall(p_data(5, 0x03, struct.pack("<HHLL", 0, 0, 4, len(body)) + body))
    _pdu_type, raw = read_pdu(sock)
    rsp = decode(io.BytesIO(raw[12:]), True, True)
    assert (rsp.CommandField, rsp.MessageIDBeingRespondedTo, rsp.Status, rsp.EventTypeID) == (0x8100, 3, 0x0110, 1)
    sock.close()
    _still_serving(listener)


def test_unsupported_operation_gets_a_status_not_a_hangup(peer: Callable[..., tuple]) -> None:
    sock, _ac, _listener = peer()
    sock.sendall(p_data(1, 0x03, dimse_command(0x0020, 9, has_dataset=True)))  # C-FIND-RQ on a storage context
    sock.sendall(p_data(1, 0x02, b"\x08\x00\x52\x00\x06\x00\x00\x00STUDY "))
    _pdu_type, raw = read_pdu(sock)
    rsp = decode(io.BytesIO(raw[12:]), True, True)
    assert (rsp.CommandField, rsp.MessageIDBeingRespondedTo, rsp.Status) == (0x8020, 9, 0x0211)
    sock.sendall(p_data(1, 0x03, dimse_command(0x0030, 10, has_dataset=False, sop_class="1.2.840.10008.1.1")))
    _pdu_type, raw = read_pdu(sock)
    rsp = decode(io.BytesIO(raw[12:]), True, True)
    assert (rsp.CommandField, rsp.Status) == (0x8030, 0x0000)  # C-ECHO on any accepted context
    sock.close()


@pytest.mark.parametrize("bad, reason", [
    (p_data(7, 0x03, b"\0" * 8), 0x06),  # a context that was never accepted
    (p_data(1, 0x02, b"dataset without command"), 0x02),
    (struct.pack(">BBL", 0x04, 0, 20) + struct.pack(">LBB", 400, 1, 3) + b"\0" * 14, 0x06),  # PDV longer than PDU
    (struct.pack(">BBL", 0x09, 0, 4) + b"\0" * 4, 0x01),  # unknown PDU type
    (struct.pack(">BBL", 0x01, 0, 4) + b"\0" * 4, 0x02),  # A-ASSOCIATE-RQ again
    (p_data(1, 0x03, struct.pack("<HHL", 0, 0x100, 2) + b"\x01"), 0x06),  # undecodable command
])
def test_protocol_violations_abort_and_serving_goes_on(peer: Callable[..., tuple], bad: bytes, reason: int) -> None:
    sock, _ac, listener = peer()
    sock.sendall(bad)
    pdu_type, raw = read_pdu(sock)
    assert pdu_type == 0x07 and raw[9] == reason
    sock.close()
    _still_serving(listener)
    assert not any(listener.storage.tmp_dir.iterdir())


def test_oversized_command_set_aborts(peer: Callable[..., tuple]) -> None:
    sock, _ac, listener = peer()
    for _ in range(3):
        sock.sendall(p_data(1, 0x01, b"\0" * 30_000))
    pdu_type, _raw = read_pdu(sock)
    assert pdu_type == 0x07
    sock.close()
    _still_serving(listener)


def test_abrupt_close_mid_dataset_leaves_no_staged_file(peer: Callable[..., tuple]) -> None:
    sock, _ac, listener = peer()
    sock.sendall(p_data(1, 0x03, dimse_command(0x0001, 1, has_dataset=True)))
    sock.sendall(p_data(1, 0x00, b"\x08\x00" * 5000))
    sock.close()
    storescu_ok = storescu(listener.port, [CT]).statuses()  # type: ignore[attr-defined]
    assert storescu_ok == ["Success"]
    assert not any(listener.storage.tmp_dir.iterdir())


def test_pynetdicom_release_and_abort(start_listener: Callable[..., Listener]) -> None:
    listener = start_listener()
    ae = AE(ae_title="PYNET")
    ae.add_requested_context(CT_STORAGE, [EXPLICIT_LE])
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="TAQRIR")  # type: ignore[attr-defined]
    assert assoc.is_established
    assoc.release()
    assert assoc.is_released
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="TAQRIR")  # type: ignore[attr-defined]
    assoc.abort()
    _still_serving(listener)


def test_acse_timeout_bounds_the_whole_association_request(start_listener: Callable[..., Listener]) -> None:
    """A peer that sends its A-ASSOCIATE-RQ a byte at a time, each within acse_timeout, held its
    connection (and a thread) as long as it liked: twenty such filled a process's connections.
    acse_timeout now bounds the whole request (PS3.8's ARTIM timer)."""
    import time

    listener = start_listener(acse_timeout=1.0)
    rq = associate_rq(contexts=[(1, CT_STORAGE, EXPLICIT_LE)])
    sock = socket.create_connection(("127.0.0.1", listener.port), timeout=10)  # type: ignore[attr-defined]
    started = time.monotonic()
    closed = None
    try:
        for byte in rq:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                closed = time.monotonic() - started
                break
            time.sleep(0.25)
            if time.monotonic() - started > 4:
                break
            sock.settimeout(0.001)
            try:
                if sock.recv(1) == b"":
                    closed = time.monotonic() - started
                    break
            except (TimeoutError, BlockingIOError):
                pass
            except OSError:
                closed = time.monotonic() - started
                break
    finally:
        sock.close()
    assert closed is not None and closed < 2.5, closed
    _still_serving(listener)
