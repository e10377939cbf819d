"""The MLLP receiver (``taqrir hl7``): ORU^R01 in, ACK out, every message kept raw.

MLLP (HL7 v2 "Minimal Lower Layer Protocol", release 2): each message is framed as
``<VT> message <FS><CR>`` on a TCP connection, and the sender waits for the ACK before sending the
next one. Per message, in this order:

1. the raw payload is committed to ``hl7_message`` (:class:`~integrations.hl7.inbox.Hl7Message`)
   before anything is parsed, so nothing received is lost whatever happens next; if even that
   fails (database down) the answer is AE 207 and the sender keeps the message and retries;
2. it is read (:func:`~integrations.hl7.oru.parse_oru`) and stored as the study's signed report
   (:func:`audit.signed.store_signed_report`, which is idempotent per MSH-10: the same control id
   twice is stored once and answered AA both times);
3. the row gets the answer, and a refusal is appended to the audit trail (``hl7.refused``);
4. the ACK goes back: AA; AR for what is not an ORU^R01 this receiver takes (framing, message
   type, version, control id); AE for a message it understood but could not store (no matching
   study, bad status, no text, undecodable characters, internal error). MSA-3 and ERR carry the
   reason.

``taqrir hl7 --replay`` runs the refused messages through steps 2-3 again (after the study
arrived, or the RIS mapping was fixed). Database work runs in a worker thread; the event loop only
frames bytes. python-hl7's asyncio MLLP server accepts the connections.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo

from hl7.mllp import start_hl7_server
from pydantic import ValidationError
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import col, select

from audit.chain import record
from audit.signed import (
    AmbiguousStudy,
    NoMatchingStudy,
    SignedReportError,
    find_study,
    store_signed_report,
)
from taqrir.db import session_scope, utcnow

from .config import Hl7Settings
from .inbox import Hl7Message
from .oru import AckCode, Header, Hl7Error, build_ack, codec_for, parse_oru, read_header

log = logging.getLogger(__name__)

START, END = b"\x0b", b"\x1c\x0d"
ACTOR_PREFIX = "hl7:"


@dataclass(frozen=True)
class Outcome:
    """What a message got."""

    ack: AckCode
    text: str = ""
    error_code: str = ""
    location: str = ""
    signed_ids: tuple[int, ...] = ()
    duplicate: bool = False


class Receiver:
    """Takes one MLLP payload at a time (thread-safe: each call has its own transactions)."""

    def __init__(self, settings: Hl7Settings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self.local = ZoneInfo(settings.timezone)

    # -- one message ---------------------------------------------------------------------------

    def handle(self, raw: bytes, peer: str, *, framing_error: str = "") -> bytes:
        """Keep, process and answer one message; returns the encoded ACK (without MLLP frame)."""
        header = read_header(raw)
        try:
            msg_id = self._keep(raw, peer, header)
        except SQLAlchemyError:
            log.exception("could not keep an HL7 message from %s: answering AE so that it is resent", peer)
            return self._encode(header, Outcome("AE", "Taqrir could not store the message (database "
                                                      "unavailable); resend it later", "207"))
        if framing_error:
            outcome = Outcome("AR", framing_error, "100")
        else:
            outcome = self.process(raw, peer, msg_id)
        self._answered(msg_id, header, outcome, peer)
        level = logging.INFO if outcome.ack == "AA" else logging.WARNING
        log.log(level, "HL7 message %d (control id %s) from %s: %s %s", msg_id, header.control_id or "-", peer,
                outcome.ack, outcome.error_code)
        return self._encode(header, outcome)

    def process(self, raw: bytes, peer: str, msg_id: int) -> Outcome:
        """Read ``raw`` and store its signed report (steps 2 of the module docstring)."""
        try:
            oru = parse_oru(raw, default_encoding=self.settings.default_encoding, local=self.local)
        except Hl7Error as err:
            return Outcome(err.ack, str(err), err.code, err.location)
        try:
            with session_scope(self.engine) as s:
                accession = self._accession(s, oru.accessions, oru.study_instance_uid)
                signed = oru.signed_report(accession=accession, raw_ref=f"hl7_message:{msg_id}",
                                           actor=ACTOR_PREFIX + (oru.header.sending_application or peer))
                result = store_signed_report(s, signed)
        except NoMatchingStudy as err:
            return Outcome("AE", str(err), "204", "OBR^1^18")
        except AmbiguousStudy as err:
            return Outcome("AE", str(err), "205", "OBR^1^18")
        except SignedReportError as err:
            return Outcome("AE", str(err), "207")
        except ValidationError as err:
            problems = "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in err.errors())
            return Outcome("AE", f"the report is not usable: {problems}"[:500], "102")
        except SQLAlchemyError:
            log.exception("storing HL7 message %d failed", msg_id)
            return Outcome("AE", "Taqrir could not store the report (internal error); resend it later", "207")
        if result.duplicate:
            return Outcome("AA", f"message control id {oru.header.control_id} was already stored; stored once",
                           signed_ids=result.signed_ids, duplicate=True)
        return Outcome("AA", "", signed_ids=result.signed_ids)

    @staticmethod
    def _accession(session: Any, candidates: Sequence[str], study_uid: str | None) -> str | None:
        """The first accession candidate (OBR-18, then OBR-3) that names a study; with a study UID
        the first candidate is kept as sent (store_signed_report checks that they agree)."""
        if study_uid or len(candidates) < 2:
            return candidates[0] if candidates else None
        for acc in candidates:
            try:
                find_study(session, study_instance_uid=None, accession_number=acc)
                return acc
            except NoMatchingStudy:
                continue
        return candidates[0]

    def _encode(self, header: Header, outcome: Outcome) -> bytes:
        text = build_ack(header, outcome.ack, text=outcome.text, error_code=outcome.error_code,
                         location=outcome.location, own_application=self.settings.application,
                         own_facility=self.settings.facility)
        try:
            codec = codec_for(header, self.settings.default_encoding)
        except Hl7Error:
            codec = "utf-8"
        return text.encode(codec, errors="replace")

    # -- the inbox -----------------------------------------------------------------------------

    def _keep(self, raw: bytes, peer: str, header: Header) -> int:
        with session_scope(self.engine) as s:
            row = Hl7Message(peer=peer[:128], control_id=header.control_id or None,
                             message_type=header.message_type[:32] or None,
                             sending_application=header.sending_application[:128] or None, raw=raw)
            s.add(row)
            s.flush()
            return row.id or 0

    def _answered(self, msg_id: int, header: Header, outcome: Outcome, peer: str, *, replay: bool = False) -> None:
        try:
            with session_scope(self.engine) as s:
                row = s.get(Hl7Message, msg_id)
                if row is None:
                    return
                row.ack_code, row.reason = outcome.ack, outcome.text or None
                row.signed_ids = json.dumps(list(outcome.signed_ids))
                if replay:
                    row.replayed_at = utcnow()
                s.add(row)
                if outcome.ack != "AA":
                    record(s, action="hl7.refused", actor=ACTOR_PREFIX + (header.sending_application or peer),
                           entity_type="Hl7Message", entity_id=str(msg_id), outcome="failure",
                           details={"control_id": header.control_id, "ack": outcome.ack,
                                    "code": outcome.error_code, "reason": outcome.text[:500], "replay": replay})
        except SQLAlchemyError:
            log.exception("could not record the answer to HL7 message %d (it is kept; replay it)", msg_id)

    # -- replay --------------------------------------------------------------------------------

    def replay(self, *, ids: Sequence[int] | None = None) -> dict[str, int]:
        """Process the kept messages that were not accepted (or never answered) again, oldest
        first; returns counts by new answer. A message whose control id was accepted since is
        skipped."""
        with session_scope(self.engine) as s:
            stmt = select(Hl7Message.id).where(col(Hl7Message.ack_code).in_(["AE", "AR", ""]))
            if ids:
                stmt = stmt.where(col(Hl7Message.id).in_(list(ids)))
            todo = [i for i in s.exec(stmt.order_by(col(Hl7Message.id))).all() if i is not None]
        counts: dict[str, int] = {}
        for msg_id in todo:
            with session_scope(self.engine) as s:
                row = s.get(Hl7Message, msg_id)
                if row is None:
                    continue
                raw, peer = row.raw, row.peer
            outcome = self.process(raw, peer, msg_id)
            self._answered(msg_id, read_header(raw), outcome, peer, replay=True)
            counts[outcome.ack] = counts.get(outcome.ack, 0) + 1
        return counts


# -- MLLP --------------------------------------------------------------------------------------


class MllpServer:
    """The asyncio MLLP server around a :class:`Receiver`."""

    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver
        s = receiver.settings
        self._allowed = tuple(ipaddress.ip_network(h, strict=False) for h in s.allowed_hosts)
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        """Listen; returns the bound port."""
        s = self.receiver.settings
        self._server = await start_hl7_server(self._connection, s.host, s.port, limit=s.max_message_bytes)
        port: int = self._server.sockets[0].getsockname()[1]
        log.info("HL7 MLLP receiver on %s:%d", s.host, port)
        return port

    async def serve_forever(self) -> None:
        assert self._server is not None
        async with self._server:
            await self._server.serve_forever()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def _allowed_peer(self, host: str) -> bool:
        if not self._allowed:
            return True
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(addr in net for net in self._allowed)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peername = writer.get_extra_info("peername") or ("?", 0)
        peer = f"{peername[0]}:{peername[1]}"
        if not self._allowed_peer(str(peername[0])):
            log.warning("HL7 connection from %s refused: not in hl7.allowed_hosts", peer)
            writer.close()
            return
        timeout = self.receiver.settings.idle_timeout
        try:
            while True:
                try:
                    block = await asyncio.wait_for(reader.readuntil(END), timeout)
                except asyncio.IncompleteReadError as err:
                    if err.partial.strip(b"\r\n\x00 "):
                        # the peer closed mid-frame: keep what came (no one is left to answer)
                        await asyncio.to_thread(self.receiver.handle, err.partial.lstrip(START), peer,
                                                framing_error="connection closed before the end of the frame")
                    return
                except asyncio.LimitOverrunError:
                    log.warning("HL7 frame from %s exceeds hl7.max_message_bytes: closing", peer)
                    return
                except TimeoutError:
                    return
                start = block.find(START)
                error = ""
                if start != 0:
                    error = ("the frame does not begin with <VT> (0x0B): MLLP frames are <VT> message <FS><CR>"
                             if start < 0 else f"{start} bytes before <VT> (0x0B) at the start of the frame")
                payload = block[start + 1 if start >= 0 else 0: -len(END)]
                ack = await asyncio.to_thread(self.receiver.handle, payload, peer, framing_error=error)
                writer.write(START + ack + END)
                await writer.drain()
        except (ConnectionError, OSError):
            log.info("HL7 connection from %s dropped", peer)
        finally:
            writer.close()


def run(settings: Hl7Settings, engine: Engine) -> None:
    """``taqrir hl7``: serve until interrupted."""

    async def main() -> None:
        server = MllpServer(Receiver(settings, engine))
        port = await server.start()
        print(f"Taqrir HL7 MLLP receiver on {settings.host}:{port} (Ctrl-C to stop)", flush=True)
        await server.serve_forever()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
