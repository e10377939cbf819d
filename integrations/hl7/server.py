"""The MLLP receiver (``taqrir hl7``): ORU^R01 in, ACK out, every message kept raw.

MLLP (HL7 v2 "Minimal Lower Layer Protocol", release 2): each message is framed as
``<VT> message <FS><CR>`` on a TCP connection, and the sender waits for the ACK before sending the
next one. Per message, in this order:

1. it is read (:func:`~integrations.hl7.oru.parse_oru`) and stored as the study's signed report
   (:func:`audit.signed.store_signed_report`, which is idempotent per MSH-10: the same control id
   twice is stored once and answered AA both times), in one transaction with the raw payload
   (``hl7_message``, :class:`~integrations.hl7.inbox.Hl7Message`) and its audit records;
2. a message that is refused is kept raw all the same, with its answer and an ``hl7.refused``
   audit record, in a transaction of its own; if even that fails (database down) the answer is
   AE 207. Either way nothing is lost: what is not answered AA stays with the sender (HL7 original
   mode acknowledgement), and what was refused is in ``hl7_message`` for replay;
3. the ACK goes back, after the commit: AA; AR for what is not an ORU^R01 this receiver takes
   (framing, message type, version, control id); AE for a message it understood but could not
   store (no matching study, bad status, no text, undecodable characters, internal error). MSA-3
   and ERR carry the reason.

``taqrir hl7 --replay`` runs the refused messages through steps 1-2 again (after the study
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
from ground.clock import utcnow
from ground.db import session_scope

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
        if framing_error:
            outcome = Outcome("AR", framing_error, "100")
            msg_id = self._refused(raw, peer, header, outcome)
        else:
            msg_id, outcome = self.process(raw, peer, header)
        level = logging.INFO if outcome.ack == "AA" else logging.WARNING
        log.log(level, "HL7 message %s (control id %s) from %s: %s %s", msg_id, header.control_id or "-", peer,
                outcome.ack, outcome.error_code)
        return self._encode(header, outcome)

    def process(self, raw: bytes, peer: str, header: Header, *, msg_id: int | None = None) -> tuple[int | None, Outcome]:
        """Read ``raw`` and store its signed report. An accepted message is kept (a new
        ``hl7_message`` row, or row ``msg_id`` on replay) in the same transaction as the report
        and its audit record: one commit, and AA only after it. A refused one is kept with its
        answer and an ``hl7.refused`` audit record in a transaction of its own. Returns the row id
        (None when even keeping it failed: the answer is then AE 207, and the sender resends)."""
        try:
            oru = parse_oru(raw, default_encoding=self.settings.default_encoding, local=self.local)
        except Hl7Error as err:
            outcome = Outcome(err.ack, str(err), err.code, err.location)
            return self._refused(raw, peer, header, outcome, msg_id=msg_id), outcome
        try:
            with session_scope(self.engine) as s:
                row = self._row(s, raw, peer, header, msg_id)
                accession = self._accession(s, oru.accessions, oru.study_instance_uid)
                signed = oru.signed_report(accession=accession, raw_ref=f"hl7_message:{row.id}",
                                           actor=ACTOR_PREFIX + (oru.header.sending_application or peer))
                result = store_signed_report(s, signed)
                outcome = Outcome("AA", signed_ids=result.signed_ids, duplicate=result.duplicate)
                if result.duplicate:
                    outcome = Outcome("AA", f"message control id {oru.header.control_id} was already stored; "
                                      "stored once", signed_ids=result.signed_ids, duplicate=True)
                self._answer_row(row, outcome, replay=msg_id is not None)
                s.add(row)
                return row.id, outcome
        except NoMatchingStudy as err:
            outcome = Outcome("AE", str(err), "204", "OBR^1^18")
        except AmbiguousStudy as err:
            outcome = Outcome("AE", str(err), "205", "OBR^1^18")
        except SignedReportError as err:
            outcome = Outcome("AE", str(err), "207")
        except ValidationError as err:
            problems = "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in err.errors())
            outcome = Outcome("AE", f"the report is not usable: {problems}"[:500], "102")
        except SQLAlchemyError:
            log.exception("storing an HL7 message from %s failed", peer)
            outcome = Outcome("AE", "Taqrir could not store the report (internal error); resend it later", "207")
        return self._refused(raw, peer, header, outcome, msg_id=msg_id), outcome

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

    @staticmethod
    def _row(session: Any, raw: bytes, peer: str, header: Header, msg_id: int | None) -> Hl7Message:
        if msg_id is not None:
            row = session.get(Hl7Message, msg_id)
            if row is not None:
                return row  # type: ignore[no-any-return]
        row = Hl7Message(peer=peer[:128], control_id=header.control_id or None,
                         message_type=header.message_type[:32] or None,
                         sending_application=header.sending_application[:128] or None, raw=raw)
        session.add(row)
        session.flush()
        return row

    @staticmethod
    def _answer_row(row: Hl7Message, outcome: Outcome, *, replay: bool) -> None:
        row.ack_code, row.reason = outcome.ack, outcome.text or None
        row.signed_ids = json.dumps(list(outcome.signed_ids))
        if replay:
            row.replayed_at = utcnow()

    def _refused(self, raw: bytes, peer: str, header: Header, outcome: Outcome, *,
                 msg_id: int | None = None) -> int | None:
        """Keep a refused message with its answer, audited (``hl7.refused``)."""
        try:
            with session_scope(self.engine) as s:
                row = self._row(s, raw, peer, header, msg_id)
                self._answer_row(row, outcome, replay=msg_id is not None)
                s.add(row)
                record(s, action="hl7.refused", actor=ACTOR_PREFIX + (header.sending_application or peer),
                       entity_type="Hl7Message", entity_id=str(row.id), outcome="failure",
                       details={"control_id": header.control_id, "ack": outcome.ack, "code": outcome.error_code,
                                "reason": outcome.text[:500], "replay": msg_id is not None})
                return row.id
        except SQLAlchemyError:
            log.exception("could not keep a refused HL7 message from %s (the sender keeps it: not AA)", peer)
            return None

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
            _, outcome = self.process(raw, peer, read_header(raw), msg_id=msg_id)
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
