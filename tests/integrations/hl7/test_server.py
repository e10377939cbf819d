"""The MLLP receiver over loopback with real MLLP clients (python-hl7's MLLPClient and a raw
socket), on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import hl7
import pytest
from hl7.client import MLLPClient
from sqlalchemy.engine import Engine
from sqlmodel import select

from audit.chain import AuditRecord, verify
from audit.deltas import ReportDelta
from audit.signed_report import SignedReport
from ground.db import session_scope
from integrations.hl7.config import Hl7Settings
from integrations.hl7.inbox import Hl7Message
from integrations.hl7.server import MllpServer, Receiver
from tests.conftest import free_port
from tests.factories.hl7 import frame, mllp_exchange, oru
from tests.factories.signed import add_study, seed


@dataclass
class Running:
    host: str
    port: int
    receiver: Receiver


@pytest.fixture
def mllp(engine: Engine) -> Iterator[Running]:
    settings = Hl7Settings(host="127.0.0.1", port=free_port())
    receiver = Receiver(settings, engine)
    server = MllpServer(receiver)
    loop = asyncio.new_event_loop()
    started = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(server.start())
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert started.wait(10)
    yield Running("127.0.0.1", settings.port, receiver)
    asyncio.run_coroutine_threadsafe(server.close(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def _msa(answer: bytes | str) -> tuple[str, str, str]:
    text = answer.decode("utf-8") if isinstance(answer, bytes) else answer
    msg = hl7.parse(text.strip("\x0b\x1c\r"))
    msa = msg.segment("MSA")
    return str(msa(1)), str(msa(2)), msg.unescape(str(msa(3))) if len(msa) > 3 else ""


def test_signed_report_in_arabic_and_english_is_stored_and_acked(engine: Engine, mllp: Running) -> None:
    _, draft_id = seed(engine)
    with MLLPClient(mllp.host, mllp.port) as client:
        answer = client.send_message(oru())
    assert _msa(answer) == ("AA", "MSG0001", "")
    with session_scope(engine) as s:
        rows = s.exec(select(SignedReport).order_by(SignedReport.language)).all()
        assert [(r.language, r.source, r.source_id, r.status) for r in rows] == [
            ("ar", "hl7", "MSG0001", "final"), ("en", "hl7", "MSG0001", "final")]
        assert rows[0].findings.startswith("الرئتان سليمتان.") and rows[0].signer_name == "Amal Radiologist"
        assert "&" in rows[1].findings and rows[1].raw_ref and rows[1].raw_ref.startswith("hl7_message:")
        kept = s.exec(select(Hl7Message)).one()
        assert kept.ack_code == "AA" and kept.raw == oru().encode() and kept.control_id == "MSG0001"
        assert {d.draft_id for d in s.exec(select(ReportDelta)).all()} == {draft_id}
        assert verify(s).ok


def test_same_control_id_twice_is_stored_once(engine: Engine, mllp: Running) -> None:
    seed(engine)
    answers = mllp_exchange(mllp.host, mllp.port, [frame(oru().encode())] * 2)
    assert [_msa(a)[0] for a in answers] == ["AA", "AA"]
    assert "stored once" in _msa(answers[1])[2]
    with session_scope(engine) as s:
        assert len(s.exec(select(SignedReport)).all()) == 2  # two languages, one message
        assert len(s.exec(select(Hl7Message)).all()) == 2  # both receipts kept


def test_unknown_accession_is_ae_kept_and_replayed_once_the_study_exists(engine: Engine, mllp: Running) -> None:
    answers = mllp_exchange(mllp.host, mllp.port, [frame(oru(accession="LATE1").encode())])
    code, ctrl, reason = _msa(answers[0])
    assert (code, ctrl) == ("AE", "MSG0001") and "accession number 'LATE1'" in reason
    err = hl7.parse(answers[0].decode()).segment("ERR")
    assert str(err(3)(1)(1)) == "204"
    with session_scope(engine) as s:
        assert not s.exec(select(SignedReport)).all()  # nothing half-stored
        kept = s.exec(select(Hl7Message)).one()
        assert kept.ack_code == "AE" and "LATE1" in (kept.reason or "")
        refused = s.exec(select(AuditRecord).where(AuditRecord.action == "hl7.refused")).one()
        assert json.loads(refused.details)["code"] == "204"
    with session_scope(engine) as s:
        add_study(s, study_uid="1.2.3.9", accession="LATE1")
    assert mllp.receiver.replay() == {"AA": 1}
    assert mllp.receiver.replay() == {}
    with session_scope(engine) as s:
        assert len(s.exec(select(SignedReport)).all()) == 2
        kept = s.exec(select(Hl7Message)).one()
        assert kept.ack_code == "AA" and kept.replayed_at is not None


def test_malformed_messages_are_refused_and_kept(engine: Engine, mllp: Running) -> None:
    seed(engine)
    garbage = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    answers = mllp_exchange(mllp.host, mllp.port, [
        frame(garbage),  # not HL7
        frame(oru(message_type="ADT^A08", control_id="ADT1").encode()),  # wrong type
        b"junk" + frame(oru(control_id="F1").encode()),  # bytes before <VT>
        frame(oru(control_id="ST1", status="X").encode()),  # status not P/F/C
        frame(oru(control_id="OK1").encode()),  # the connection still works
    ])
    assert [_msa(a)[0] for a in answers[:4]] == ["AR", "AR", "AR", "AE"]
    assert "no MSH" in _msa(answers[0])[2] and "ADT" in _msa(answers[1])[2]
    assert "before <VT>" in _msa(answers[2])[2] and "OBR-25" in _msa(answers[3])[2]
    assert _msa(answers[4])[:2] == ("AA", "OK1")
    with session_scope(engine) as s:
        kept = s.exec(select(Hl7Message).order_by(Hl7Message.id)).all()
        assert [m.ack_code for m in kept] == ["AR", "AR", "AR", "AE", "AA"]
        assert kept[0].raw == garbage  # nothing lost
        assert {r.source_id for r in s.exec(select(SignedReport)).all()} == {"OK1"}


def test_peer_closing_mid_frame_is_kept(engine: Engine, mllp: Running) -> None:
    import socket
    import time

    with socket.create_connection((mllp.host, mllp.port)) as sock:
        sock.sendall(b"\x0b" + oru(control_id="HALF").encode()[:80])
    for _ in range(100):
        with session_scope(engine) as s:
            kept = s.exec(select(Hl7Message)).first()
        if kept is not None and kept.ack_code:
            break
        time.sleep(0.05)
    assert kept is not None and kept.ack_code == "AR" and kept.control_id == "HALF"
    assert kept.raw.startswith(b"MSH|")


def test_corrected_report_supersedes(engine: Engine, mllp: Running) -> None:
    seed(engine)
    corrected = oru(control_id="MSG0002", status="C",
                    obx=[("TX", "&GDT", "The lungs are clear. No effusion.", "C")])
    answers = mllp_exchange(mllp.host, mllp.port, [frame(oru().encode()), frame(corrected.encode())])
    assert [_msa(a)[0] for a in answers] == ["AA", "AA"]
    with session_scope(engine) as s:
        en = s.exec(select(SignedReport).where(SignedReport.language == "en").order_by(SignedReport.id)).all()
        assert [(r.status, r.current) for r in en] == [("final", False), ("corrected", True)]


def test_arabic_in_iso_8859_6(engine: Engine, mllp: Running) -> None:
    seed(engine)
    msg = oru(control_id="ISO1", charset="8859/6", obx=[("TX", "&IMP", "انصباب جنبي أيسر صغير.", "F")])
    answers = mllp_exchange(mllp.host, mllp.port, [frame(msg.encode("iso-8859-6"))])
    assert _msa(answers[0])[:2] == ("AA", "ISO1") and b"8859/6" in answers[0]
    with session_scope(engine) as s:
        row = s.exec(select(SignedReport)).one()
        assert (row.language, row.impression) == ("ar", "انصباب جنبي أيسر صغير.")
