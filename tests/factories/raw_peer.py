"""A raw DICOM Upper Layer peer for tests: PDUs and command sets built by hand (through
pynetdicom's codecs), so a test can do what real senders rarely do, or stop half-way through a
transfer."""

from __future__ import annotations

import socket
import struct

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom.dsutils import encode
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import build_context

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def associate_rq(*, contexts: list[tuple[int, str, str]], max_pdu: int = 0, app_context: str = "1.2.840.10008.3.1.1.1",
                 roles: list[tuple[str, bool, bool]] = ()) -> bytes:  # type: ignore[assignment]
    """An A-ASSOCIATE-RQ from RAWPEER to TAQRIR proposing ``contexts`` (id, abstract syntax,
    transfer syntax), with a maximum PDU length and SCP/SCU role selections."""
    p = A_ASSOCIATE()
    p.application_context_name = UID(app_context)
    p.calling_ae_title = "RAWPEER"
    p.called_ae_title = "TAQRIR"
    cxs = []
    for cid, abstract, ts in contexts:
        cx = build_context(abstract, [ts])
        cx.context_id = cid
        cxs.append(cx)
    p.presentation_context_definition_list = cxs
    ml = MaximumLengthNotification()
    ml.maximum_length_received = max_pdu
    impl = ImplementationClassUIDNotification()
    impl.implementation_class_uid = UID("1.2.3.4")
    items: list[object] = [ml, impl]
    for uid, scu, scp in roles:
        role = SCP_SCU_RoleSelectionNegotiation()
        role.sop_class_uid = UID(uid)
        role.scu_role, role.scp_role = scu, scp
        items.append(role)
    p.user_information = items
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(p)
    return bytes(pdu.encode())


def read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    """The next PDU: its type and its bytes, header included."""
    head = exact(sock, 6)
    pdu_type, _, length = struct.unpack(">BBL", head)
    return pdu_type, head + exact(sock, length)


def exact(sock: socket.socket, n: int) -> bytes:
    """Exactly ``n`` bytes from ``sock``; ConnectionError if it closes before."""
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ConnectionError(f"closed after {len(out)} of {n} bytes")
        out += chunk
    return out


def p_data(context_id: int, control: int, data: bytes) -> bytes:
    """A P-DATA-TF PDU of one PDV (``control``: bit 0 command, bit 1 last fragment)."""
    return struct.pack(">BBLLBB", 0x04, 0, len(data) + 6, len(data) + 2, context_id, control) + data


def dimse_command(field: int, message_id: int, *, has_dataset: bool, sop_class: str = CT_STORAGE,
                  sop_instance: str = "1.2.3.4.5") -> bytes:
    """A request command set (Implicit VR Little Endian, with its group length)."""
    cmd = Dataset()
    cmd.AffectedSOPClassUID = sop_class
    cmd.CommandField = field
    cmd.MessageID = message_id
    if field != 0x0030:
        cmd.Priority = 0
    cmd.CommandDataSetType = 0x0000 if has_dataset else 0x0101
    if field == 0x0001:
        cmd.AffectedSOPInstanceUID = sop_instance
    body = encode(cmd, True, True)
    assert body is not None
    return struct.pack("<HHLL", 0, 0, 4, len(body)) + body


