"""ORU^R01 messages as a RIS sends them, and an MLLP peer over a real socket."""

from __future__ import annotations

import socket
from collections.abc import Sequence

FINDINGS_EN = "The lungs are clear.\\.br\\Small left pleural effusion \\T\\ atelectasis (5 mm\\S\\2)."
IMPRESSION_EN = "Small left pleural effusion."
FINDINGS_AR = "الرئتان سليمتان.\\.br\\انصباب جنبي أيسر صغير."
IMPRESSION_AR = "انصباب جنبي أيسر صغير."


def oru(*, control_id: str = "MSG0001", accession: str = "ACC1001", status: str = "F",
        charset: str = "UNICODE UTF-8", obx: Sequence[tuple[str, str, str, str]] | None = None,
        message_type: str = "ORU^R01^ORU_R01", version: str = "2.5.1", obr3: str | None = None,
        zds: str | None = None, sep: str = "\r") -> str:
    """An ORU^R01: ``obx`` rows are (value type, OBX-3 code, OBX-5 text, OBX-11 status)."""
    rows = obx if obx is not None else [
        ("FT", "&GDT^Body", FINDINGS_EN, "F"),
        ("TX", "&IMP^Impression", IMPRESSION_EN, "F"),
        ("FT", "&GDT^Body", FINDINGS_AR, "F"),
        ("TX", "&IMP^Impression", IMPRESSION_AR, "F"),
    ]
    msh = (f"MSH|^~\\&|RIS|HOSP|TAQRIR|HOSP|20261201120000||{message_type}|{control_id}|P|{version}"
           f"||||||{charset}")
    segs = [
        msh,
        "PID|1||PAT001^^^HOSP||Doe^Jane||19700101|F",
        (f"OBR|1|PL001|{obr3 or accession}^RIS|71020^XR CHEST 2 VIEWS|||20261201110000|||||||||||{accession}"
         f"||||20261201115500+0300|||{status}|||||||D1234&Radiologist&Amal"),
    ]
    if zds:
        segs.append(f"ZDS|{zds}^RIS^Application^DICOM")
    for i, (vt, code, text, st) in enumerate(rows, 1):
        segs.append(f"OBX|{i}|{vt}|{code}||{text}||||||{st}")
    return sep.join(segs) + sep


def mllp_exchange(host: str, port: int, frames: Sequence[bytes], *, timeout: float = 20.0) -> list[bytes]:
    """Send raw (already framed) bytes one frame at a time on one connection; return each
    answer's payload (between <VT> and <FS><CR>)."""
    answers = []
    with socket.create_connection((host, port), timeout=timeout) as sock:
        for frame in frames:
            sock.sendall(frame)
            buf = b""
            while not buf.endswith(b"\x1c\x0d"):
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError(f"connection closed after {buf!r}")
                buf += chunk
            answers.append(buf[1:-2])
    return answers


def frame(payload: bytes) -> bytes:
    return b"\x0b" + payload + b"\x1c\x0d"
