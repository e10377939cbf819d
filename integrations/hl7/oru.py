"""ORU^R01 (HL7 v2 chapter 7, observation results) in: bytes -> a signed report, and the ACK out.

Pure: bytes in, typed values out, no socket and no database (the MLLP server and the replay in
:mod:`integrations.hl7.server` call these). Parsing uses python-hl7 (a lenient parser that keeps
every field as sent, with the message's own separators and escape handling).

What is read, and from where:

* Character set: MSH-18 (``UNICODE UTF-8``, ``8859/1``, ``8859/6`` Arabic, ``ASCII``); read
  from the raw bytes before decoding. Without MSH-18, ``hl7.default_encoding``.
* Message: MSH-9 must be ORU^R01, MSH-12 a v2 version, MSH-10 (the control id) present:
  otherwise the message is *rejected* (AR, v2 table 0357 codes 200/203/101).
* Result status: OBR-25 (table 0123): F final, C corrected, P preliminary; any other value is an
  error (AE, 103). Without OBR-25, from the OBX-11 values (table 0085): any C -> corrected, all F
  -> final, else P -> preliminary. OBX with OBX-11 D (delete), W (wrong) or X (cannot be obtained)
  are left out of the text.
* Text: every OBX whose value type (OBX-2) is FT, TX or ST, in order; OBX-5 repetitions are lines;
  escape sequences (v2 section 2.7: ``\\F\\ \\S\\ \\T\\ \\R\\ \\E\\``, ``\\.br\\``, ``\\.sp\\``,
  ``\\Xhh\\`` ...) are decoded. OBX-3 says the section: ``&IMP``/LOINC 19005-8/DCM 121072 are the
  impression, every other text observation (``&GDT`` body, LOINC 59776-5 findings ...) the
  findings. The language of each OBX is its script (Arabic letters or Latin): a bilingual report
  is two texts.
* Study: Accession Number from OBR-18 (Placer Field 1, where IHE Scheduled Workflow carries it)
  and OBR-3.1 (Filler Order Number, which many RIS set to the accession number), tried in that
  order; Study Instance UID from ZDS-1.1 (IHE) or an OBX whose OBX-3 is DCM 113014.
* Signer: OBR-32 (Principal Result Interpreter: id & family & given); signed at OBR-22.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from typing import Any, Final, Literal

import hl7
from hl7.exceptions import ParseException

from audit.deltas import script_language
from audit.signed import SignedReportIn, SignedText
from ground.errors import TaqrirError

AckCode = Literal["AA", "AE", "AR"]

#: MSH-18 values (v2 table 0211) -> Python codecs.
CHARSETS: Final[dict[str, str]] = {
    "ASCII": "ascii",
    "UNICODE UTF-8": "utf-8",
    "UNICODE": "utf-8",
    "UTF-8": "utf-8",
    "8859/1": "iso-8859-1",
    "8859/2": "iso-8859-2",
    "8859/5": "iso-8859-5",
    "8859/6": "iso-8859-6",
    "8859/7": "iso-8859-7",
    "8859/8": "iso-8859-8",
    "8859/9": "iso-8859-9",
    "8859/15": "iso-8859-15",
}

_TEXT_TYPES = frozenset({"FT", "TX", "ST"})
_LEFT_OUT = frozenset({"D", "W", "X"})
_IMPRESSION_CODES = frozenset({"&IMP", "IMP", "19005-8", "121072", "121073"})
_STUDY_UID_CODES = frozenset({"113014"})
_STATUS: Final[dict[str, Literal["final", "corrected", "preliminary"]]] = {
    "F": "final", "C": "corrected", "P": "preliminary"}
_ESCAPES = {".br": "\n", ".sp": "\n", ".ce": "\n", ".fi": "", ".nf": "", "H": "", "N": ""}
_DTM = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.\d{1,4})?([+-]\d{4})?$")


class Hl7Error(TaqrirError):
    """A message Taqrir cannot take: ``ack`` is what to answer, ``code`` the table 0357 code."""

    def __init__(self, message: str, *, ack: AckCode, code: str, location: str = "") -> None:
        super().__init__(message)
        self.ack: AckCode = ack
        self.code = code
        self.location = location


def _reject(message: str, code: str, location: str = "") -> Hl7Error:
    return Hl7Error(message, ack="AR", code=code, location=location)


def _error(message: str, code: str, location: str = "") -> Hl7Error:
    return Hl7Error(message, ack="AE", code=code, location=location)


@dataclass(frozen=True)
class Header:
    """MSH fields needed to answer, read from raw bytes even when the rest cannot be parsed."""

    field_sep: str = "|"
    encoding_chars: str = "^~\\&"
    sending_application: str = ""
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    message_type: str = ""
    control_id: str = ""
    processing_id: str = "P"
    version: str = "2.5.1"
    charset: str = ""


def segments_of(text: str) -> list[str]:
    """Segments, accepting CR (the standard), LF and CRLF as separators."""
    return [s for s in re.split(r"\r\n|\r|\n", text) if s.strip()]


def read_header(raw: bytes) -> Header:
    """The MSH of ``raw`` (decoded as Latin-1, which never fails and keeps ASCII as is: MSH
    values are ASCII); an empty Header when there is no MSH at the start."""
    text = raw.decode("iso-8859-1").lstrip("\x0b\r\n ")
    if not text.startswith("MSH") or len(text) < 8:
        return Header()
    first = segments_of(text)[0]
    sep = first[3]
    parts = first.split(sep)

    def f(n: int) -> str:  # MSH-n: MSH-1 is the separator itself, so MSH-n is parts[n - 1]
        return parts[n - 1].strip() if len(parts) > n - 1 else ""

    return Header(field_sep=sep, encoding_chars=parts[1] if len(parts) > 1 else "^~\\&",
                  sending_application=f(3), sending_facility=f(4), receiving_application=f(5),
                  receiving_facility=f(6), message_type=f(9), control_id=f(10)[:64],
                  processing_id=f(11) or "P", version=f(12) or "2.5.1", charset=f(18))


def codec_for(header: Header, default: str) -> str:
    """The codec MSH-18 names (first repetition), or ``default``; unknown names are an error."""
    if not header.charset:
        return default
    name = header.charset.split(header.encoding_chars[1:2] or "~")[0].strip().upper()
    if name not in CHARSETS:
        raise _error(f"MSH-18 character set {name!r} is not supported: use UNICODE UTF-8 (or one of "
                     f"{', '.join(sorted(CHARSETS))})", "103", "MSH^1^18")
    return CHARSETS[name]


@dataclass(frozen=True)
class OruReport:
    """What an ORU^R01 says, before its study is looked up."""

    header: Header
    status: Literal["final", "corrected", "preliminary"]
    accessions: tuple[str, ...]
    study_instance_uid: str | None
    texts: tuple[SignedText, ...]
    signer_id: str | None = None
    signer_name: str | None = None
    signed_at: datetime | None = None
    observations: int = 0
    warnings: tuple[str, ...] = field(default=())

    def signed_report(self, *, accession: str | None, raw_ref: str, actor: str) -> SignedReportIn:
        """The signed report to store, under the accession number that matched a study."""
        return SignedReportIn(source="hl7", source_id=self.header.control_id, status=self.status,
                              accession_number=accession, study_instance_uid=self.study_instance_uid,
                              texts=self.texts, signer_id=self.signer_id, signer_name=self.signer_name,
                              signed_at=self.signed_at, raw_ref=raw_ref, actor=actor)


def _field(seg: Any, n: int) -> str:
    try:
        return str(seg(n)).strip()
    except (IndexError, KeyError):
        return ""


def _component(value: str, sep: str, n: int = 1) -> str:
    parts = value.split(sep)
    return parts[n - 1].strip() if len(parts) >= n else ""


def parse_dtm(value: str, local: tzinfo) -> datetime | None:
    """An HL7 DTM (YYYY[MM[DD[HH[MM[SS[.S]]]]]][+/-ZZZZ]) as an aware datetime; values without
    an offset are in ``local`` (the sender's time zone, ``hl7.timezone``). None when unreadable."""
    m = _DTM.match(value.strip())
    if not m:
        return None
    y, mo, d, h, mi, s, off = m.groups()
    tz: tzinfo = local
    if off:
        sign = 1 if off[0] == "+" else -1
        tz = timezone(sign * timedelta(hours=int(off[1:3]), minutes=int(off[3:5])))
    try:
        return datetime(int(y), int(mo or 1), int(d or 1), int(h or 0), int(mi or 0), int(s or 0), tzinfo=tz)
    except ValueError:
        return None


def check_header(header: Header) -> None:
    """Refuse (AR) what is not an ORU^R01 of a v2 version with a control id."""
    comp = header.encoding_chars[:1] or "^"
    mtype = header.message_type.split(comp)
    if not header.message_type:
        raise _reject("no MSH segment at the start of the message (or MSH-9 empty): send an HL7 v2 "
                      "ORU^R01 in an MLLP frame", "100", "MSH")
    if mtype[0] != "ORU":
        raise _reject(f"message type {mtype[0]!r} is not accepted here: Taqrir takes ORU^R01 (signed "
                      "results)", "200", "MSH^1^9^1")
    if len(mtype) < 2 or mtype[1] != "R01":
        raise _reject(f"trigger event {'^'.join(mtype[1:2]) or '(none)'} is not accepted: send ORU^R01",
                      "201", "MSH^1^9^2")
    if not re.match(r"^2\.\d", header.version):
        raise _reject(f"HL7 version {header.version!r} is not supported: send v2.3 to v2.8", "203", "MSH^1^12")
    if not header.control_id:
        raise _reject("MSH-10 (message control id) is empty: it is needed to store a report once", "101",
                      "MSH^1^10")


def parse_oru(raw: bytes, *, default_encoding: str = "utf-8", local: tzinfo = UTC) -> OruReport:
    """Read an ORU^R01 (see the module docstring); :class:`Hl7Error` says what to answer."""
    header = read_header(raw)
    check_header(header)
    codec = codec_for(header, default_encoding)
    try:
        text = raw.decode(codec)
    except UnicodeDecodeError as err:
        raise _error(f"the message is not valid {codec} (MSH-18 {header.charset or 'absent'}) at byte "
                     f"{err.start}: send it in the character set MSH-18 names", "102", "MSH^1^18") from err
    try:
        msg = hl7.parse("\r".join(segments_of(text)))
    except (ParseException, IndexError, ValueError) as err:
        raise _reject(f"the message cannot be parsed as HL7 v2: {err}", "100") from err
    # python-hl7's separators: segment, field, repetition, component, sub-component
    rep, comp, sub = msg.separators[2], msg.separators[3], msg.separators[4]
    try:
        obr = msg.segment("OBR")
    except KeyError as err:
        raise _error("no OBR segment: an ORU^R01 result needs OBR (with the accession number and status)",
                     "100", "OBR") from err
    accessions = tuple(dict.fromkeys(a for a in (_component(_field(obr, 18), comp),
                                                 _component(_field(obr, 3), comp)) if a))
    study_uid = None
    try:
        study_uid = _component(_field(msg.segment("ZDS"), 1), comp) or None
    except KeyError:
        pass
    obr_status = _field(obr, 25).upper()
    by_lang: dict[str, dict[str, list[str]]] = {}
    obx_status: list[str] = []
    count = 0
    for obx in _all(msg, "OBX"):
        code = _component(_field(obx, 3), comp)
        vtype = _field(obx, 2).upper()
        status = _field(obx, 11).upper()
        if code in _STUDY_UID_CODES:
            study_uid = study_uid or _component(_field(obx, 5), comp) or None
            continue
        if vtype not in _TEXT_TYPES or status in _LEFT_OUT:
            continue
        lines = [msg.unescape(r, _ESCAPES).replace("\r", "\n") for r in _field(obx, 5).split(rep)]
        body = "\n".join(line.rstrip() for line in lines).strip()
        if not body:
            continue
        count += 1
        obx_status.append(status)
        lang = script_language(body) or "en"
        section = "impression" if code.upper() in _IMPRESSION_CODES else "findings"
        by_lang.setdefault(lang, {"findings": [], "impression": []})[section].append(body)
    if not count:
        raise _error("no text result: the ORU^R01 has no OBX of value type FT, TX or ST with text", "101", "OBX^1^5")
    status = _status(obr_status, obx_status)
    if not accessions and not study_uid:
        raise _error("no accession number (OBR-18 or OBR-3) and no Study Instance UID (ZDS-1): Taqrir "
                     "cannot tell which study this report signs", "101", "OBR^1^18")
    interpreter = _field(obr, 32).split(rep)[0]
    name_parts = _component(interpreter, comp).split(sub)
    signer_id = name_parts[0].strip() or None
    signer_name = " ".join(p.strip() for p in reversed(name_parts[1:3]) if p.strip()) or None
    texts = tuple(
        SignedText(language=lang, findings="\n".join(sec["findings"]),  # type: ignore[arg-type]
                   impression="\n".join(sec["impression"]))
        for lang, sec in sorted(by_lang.items())
    )
    return OruReport(header=header, status=status, accessions=accessions, study_instance_uid=study_uid,
                     texts=texts, signer_id=signer_id, signer_name=signer_name,
                     signed_at=parse_dtm(_field(obr, 22), local), observations=count)


def _all(msg: hl7.Message, segment_id: str) -> list[Any]:
    try:
        return list(msg.segments(segment_id))
    except KeyError:
        return []


def _status(obr_status: str, obx_status: list[str]) -> Literal["final", "corrected", "preliminary"]:
    if obr_status:
        if obr_status not in _STATUS:
            raise _error(f"OBR-25 result status {obr_status!r} is not one Taqrir stores: send P "
                         "(preliminary), F (final) or C (corrected)", "103", "OBR^1^25")
        return _STATUS[obr_status]
    given = [s for s in obx_status if s]
    if "C" in given:
        return "corrected"
    if given and all(s == "F" for s in given):
        return "final"
    if "P" in given:
        return "preliminary"
    raise _error("no result status: set OBR-25 (or OBX-11) to P, F or C", "101", "OBR^1^25")


# -- the answer --------------------------------------------------------------------------------


def _escape(value: str, header: Header) -> str:
    """Text for an ACK field, with the separators escaped (v2 section 2.7.4)."""
    esc = header.encoding_chars[2:3] or "\\"
    out = value.replace(esc, f"{esc}E{esc}").replace(header.field_sep, f"{esc}F{esc}")
    for ch, code in zip(header.encoding_chars[:2] + header.encoding_chars[3:4], "SRT", strict=False):
        out = out.replace(ch, f"{esc}{code}{esc}")
    return " ".join(out.split())


def build_ack(header: Header, code: AckCode, *, text: str = "", error_code: str = "", location: str = "",
              own_application: str = "TAQRIR", own_facility: str = "", ack_control_id: str = "",
              now: datetime | None = None) -> str:
    """An original-mode ACK (v2 section 2.9.2): MSH (sender and receiver swapped, same version and
    character set), MSA-1 ``code``, MSA-2 the message's control id, MSA-3 ``text``; for AE/AR an
    ERR segment with ERR-2 ``location``, ERR-3 the table 0357 code, ERR-4 severity E and ERR-8
    the same text. Returns the text with CR segment separators (no MLLP frame)."""
    f = header.field_sep
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%d%H%M%S")
    trigger = header.message_type.split(header.encoding_chars[:1] or "^")
    event = trigger[1] if len(trigger) > 1 else ""
    comp = header.encoding_chars[:1] or "^"
    msh = [
        "MSH", header.encoding_chars, own_application, own_facility, header.sending_application,
        header.sending_facility, stamp, "", f"ACK{comp}{event}{comp}ACK" if event else "ACK",
        ack_control_id or f"ACK{stamp}", header.processing_id or "P", header.version or "2.5.1",
        "", "", "", "", "", header.charset,
    ]
    while msh and msh[-1] == "":
        msh.pop()
    message = _escape(text, header)[:500] if text else ""
    segments = [f.join(msh), f.join(["MSA", code, header.control_id] + ([message] if message else []))]
    if code != "AA":
        err = ["ERR", "", location, f"{error_code or '207'}{comp}{comp}HL70357", "E", "", "", "", message]
        segments.append(f.join(err))
    return "\r".join(segments) + "\r"
