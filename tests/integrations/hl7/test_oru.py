"""Reading ORU^R01 and writing ACKs (pure, no socket)."""

from __future__ import annotations

from datetime import UTC, datetime

import hl7
import pytest

from integrations.hl7.oru import Hl7Error, build_ack, parse_oru, read_header
from tests.factories.hl7 import oru


def test_text_status_study_and_signer() -> None:
    r = parse_oru(oru().encode())
    assert r.status == "final" and r.accessions == ("ACC1001",) and r.header.control_id == "MSG0001"
    en, ar = {t.language: t for t in r.texts}["en"], {t.language: t for t in r.texts}["ar"]
    # \.br\ is a line break, \T\ and \S\ the escaped & and ^
    assert en.findings == "The lungs are clear.\nSmall left pleural effusion & atelectasis (5 mm^2)."
    assert en.impression == "Small left pleural effusion."
    assert ar.findings == "الرئتان سليمتان.\nانصباب جنبي أيسر صغير." and ar.impression == "انصباب جنبي أيسر صغير."
    assert r.signer_id == "D1234" and r.signer_name == "Amal Radiologist"
    assert r.signed_at == datetime(2026, 12, 1, 8, 55, tzinfo=UTC)
    assert r.observations == 4


def test_repetitions_multiple_obx_and_left_out_observations() -> None:
    msg = oru(obx=[("TX", "&GDT", "Line 1~Line 2", "F"), ("TX", "&GDT", "Line 3", "F"),
                   ("TX", "&GDT", "Withdrawn text", "W"), ("NM", "8867-4^Heart rate^LN", "72", "F"),
                   ("ST", "113014^Study Instance UID^DCM", "1.2.3.4", "F")], status="")
    r = parse_oru(msg.encode())
    assert [t.findings for t in r.texts] == ["Line 1\nLine 2\nLine 3"]
    assert r.study_instance_uid == "1.2.3.4" and r.status == "final"


@pytest.mark.parametrize(("obr", "obx", "expected"), [
    ("C", ["F"], "corrected"), ("P", ["F"], "preliminary"), ("", ["F", "C"], "corrected"),
    ("", ["P", "F"], "preliminary"), ("", ["F", "F"], "final"),
])
def test_status_from_obr25_then_obx11(obr: str, obx: list[str], expected: str) -> None:
    rows = [("TX", "&GDT", f"text {i}", s) for i, s in enumerate(obx)]
    assert parse_oru(oru(status=obr, obx=rows).encode()).status == expected


def test_accession_candidates_zds_and_line_feeds() -> None:
    r = parse_oru(oru(obr3="FILLER9", zds="1.2.840.99.1", sep="\n").encode())
    assert r.accessions == ("ACC1001", "FILLER9") and r.study_instance_uid == "1.2.840.99.1"


def test_iso_8859_6_arabic() -> None:
    msg = oru(charset="8859/6", obx=[("TX", "&GDT", "انصباب جنبي أيسر صغير.", "F")])
    assert parse_oru(msg.encode("iso-8859-6")).texts[0].findings == "انصباب جنبي أيسر صغير."


@pytest.mark.parametrize(("raw", "ack", "code", "words"), [
    (b"this is not hl7", "AR", "100", "no MSH"),
    (oru(message_type="ADT^A01").encode(), "AR", "200", "ADT"),
    (oru(message_type="ORU^R30").encode(), "AR", "201", "R30"),
    (oru(version="3.0").encode(), "AR", "203", "3.0"),
    (oru(control_id="").encode(), "AR", "101", "MSH-10"),
    (oru(status="X").encode(), "AE", "103", "OBR-25"),
    (oru(status="", obx=[("TX", "&GDT", "text", "")]).encode(), "AE", "101", "no result status"),
    (oru(obx=[("NM", "x", "1", "F")]).encode(), "AE", "101", "no text result"),
    (oru(accession="").encode(), "AE", "101", "no accession number"),
    (oru(charset="EBCDIC").encode(), "AE", "103", "EBCDIC"),
    (oru().encode("utf-8").replace("الرئتان".encode(), b"\xff\xfe"), "AE", "102", "not valid utf-8"),
    (oru().replace("OBR|", "XXX|").encode(), "AE", "100", "no OBR"),
])
def test_bad_messages_say_what_to_answer(raw: bytes, ack: str, code: str, words: str) -> None:
    with pytest.raises(Hl7Error, match=words) as info:
        parse_oru(raw)
    assert (info.value.ack, info.value.code) == (ack, code)


def test_ack_reads_back_with_python_hl7() -> None:
    header = read_header(oru(control_id="C77").encode())
    text = build_ack(header, "AE", text="no study | with accession ^ X", error_code="204", location="OBR^1^18",
                     own_application="TAQRIR", ack_control_id="A1")
    msg = hl7.parse(text)
    assert str(msg.segment("MSH")(9)) == "ACK^R01^ACK" and str(msg.segment("MSH")(5)) == "RIS"
    msa, err = msg.segment("MSA"), msg.segment("ERR")
    assert str(msa(1)) == "AE" and str(msa(2)) == "C77"
    assert msg.unescape(str(msa(3))) == "no study | with accession ^ X"
    assert str(err(3)(1)(1)) == "204" and str(err(4)) == "E"
    assert str(msg.segment("MSH")(18)) == "UNICODE UTF-8"
    ok = hl7.parse(build_ack(header, "AA"))
    assert str(ok.segment("MSA")(1)) == "AA" and not any(str(s[0]) == "ERR" for s in ok)
