"""The few DICOM wire structures the Storage SCP reads and writes itself (pure, no I/O).

- DIMSE command sets (PS3.7 6.3 and Annex E): group 0000, always Implicit VR Little Endian. We
  decode requests into :class:`Command` and encode C-STORE/C-ECHO responses.
- The File Meta Information header (PS3.10 7.1, Explicit VR Little Endian) put in front of a
  received dataset, so a stored instance is a complete Part 10 file whose dataset bytes are exactly
  what the sender sent.

pynetdicom and pydicom can build both, generically (a Dataset per message, element by element);
these are the hot path of ingest (two command sets and one meta header per instance), so they are
encoded here directly and checked against pydicom and pynetdicom in the tests.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

# Command Field values (PS3.7 E.1)
C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
C_ECHO_RQ = 0x0030
C_ECHO_RSP = 0x8030
N_EVENT_REPORT_RQ = 0x0100
N_EVENT_REPORT_RSP = 0x8100
NO_DATASET = 0x0101

_US = struct.Struct("<H")
_UL = struct.Struct("<L")
_TAG_LEN = struct.Struct("<HHL")
MAX_COMMAND_BYTES = 64 * 1024


_UID_TEXT = re.compile(r"[0-9]+(\.[0-9]+)*")


def is_valid_uid(text: str) -> bool:
    """A UID as PS3.5 9.1 spells it: numeric components separated by dots, 64 characters at
    most. Leading zeros in a component, which 9.1 forbids, pass: real devices send them."""
    return len(text) <= 64 and _UID_TEXT.fullmatch(text) is not None


class CommandError(ValueError):
    """A command set that cannot be decoded (the association is then aborted)."""


@dataclass(frozen=True)
class Command:
    """The parts of a DIMSE request command set the SCP acts on."""

    command_field: int
    message_id: int
    has_dataset: bool
    affected_sop_class_uid: str
    affected_sop_instance_uid: str
    move_originator_ae: str
    event_type_id: int = 0


def _text(raw: bytes) -> str:
    return raw.rstrip(b"\x00 ").decode("ascii", "backslashreplace").strip()  # an odd byte shown as \xNN


def decode_command(data: bytes) -> Command:
    """Decode an Implicit VR Little Endian command set; raises :class:`CommandError`."""
    if len(data) > MAX_COMMAND_BYTES:
        raise CommandError(f"command set of {len(data)} bytes is larger than {MAX_COMMAND_BYTES}")
    values: dict[int, bytes] = {}
    pos, end = 0, len(data)
    while pos < end:
        if end - pos < 8:
            raise CommandError("command set ends inside an element header")
        group, elem, length = _TAG_LEN.unpack_from(data, pos)
        pos += 8
        if group != 0x0000:
            raise CommandError(f"element ({group:04X},{elem:04X}) outside group 0000 in a command set")
        if length > end - pos:
            raise CommandError(f"element (0000,{elem:04X}) is longer than the command set")
        values[elem] = data[pos:pos + length]
        pos += length

    def us(elem: int) -> int:
        raw = values.get(elem)
        if raw is None or len(raw) != 2:
            raise CommandError(f"command element (0000,{elem:04X}) is missing or not a US value")
        return int(_US.unpack(raw)[0])

    return Command(
        command_field=us(0x0100),
        message_id=us(0x0110),
        has_dataset=us(0x0800) != NO_DATASET,
        affected_sop_class_uid=_text(values.get(0x0002, b"")),
        affected_sop_instance_uid=_text(values.get(0x1000, b"")),
        move_originator_ae=_text(values.get(0x1030, b"")),
        event_type_id=int(_US.unpack(values[0x1002])[0]) if len(values.get(0x1002, b"")) == 2 else 0,
    )


def _element(elem: int, value: bytes) -> bytes:
    return _TAG_LEN.pack(0x0000, elem, len(value)) + value


def _uid(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def _padded(value: str) -> bytes:
    raw = value.encode("ascii", "replace")
    return raw + b" " if len(raw) % 2 else raw


def encode_response(
    command_field: int,
    message_id: int,
    status: int,
    *,
    sop_class_uid: str = "",
    sop_instance_uid: str = "",
    error_comment: str = "",
    event_type_id: int | None = None,
) -> bytes:
    """A response command set (no dataset), elements in ascending tag order as PS3.7 requires."""
    body = b""
    if sop_class_uid:
        body += _element(0x0002, _uid(sop_class_uid))
    body += _element(0x0100, _US.pack(command_field))
    body += _element(0x0120, _US.pack(message_id))
    body += _element(0x0800, _US.pack(NO_DATASET))
    body += _element(0x0900, _US.pack(status))
    if error_comment:
        # Error Comment (LO, 64 characters at most, PS3.7 C.4.2)
        body += _element(0x0902, _padded(error_comment[:64]))
    if sop_instance_uid:
        body += _element(0x1000, _uid(sop_instance_uid))
    if event_type_id is not None:  # N-EVENT-REPORT-RSP (PS3.7 10.3.1)
        body += _element(0x1002, _US.pack(event_type_id))
    return _element(0x0000, _UL.pack(len(body))) + body


def _meta_element(group_elem: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return struct.pack("<HH2s2xL", 0x0002, group_elem, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, group_elem, vr, len(value)) + value


def file_meta(
    *,
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax_uid: str,
    implementation_class_uid: str,
    implementation_version: str,
    source_ae: str,
) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information group (PS3.10 7.1)."""
    body = (
        _meta_element(0x0001, b"OB", b"\x00\x01")
        + _meta_element(0x0002, b"UI", _uid(sop_class_uid))
        + _meta_element(0x0003, b"UI", _uid(sop_instance_uid))
        + _meta_element(0x0010, b"UI", _uid(transfer_syntax_uid))
        + _meta_element(0x0012, b"UI", _uid(implementation_class_uid))
        + _meta_element(0x0013, b"SH", _padded(implementation_version))
    )
    if source_ae:
        body += _meta_element(0x0016, b"AE", _padded(source_ae))
    return b"\x00" * 128 + b"DICM" + _meta_element(0x0000, b"UL", _UL.pack(len(body))) + body
