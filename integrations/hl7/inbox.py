"""Every HL7 v2 message received over MLLP, raw, with the answer it got.

The raw bytes are kept before anything is parsed, so a message that was refused (malformed, no
matching study yet, a database outage) is never lost: ``taqrir hl7 --replay`` feeds the refused
ones through the same handler again once the cause is fixed. Identifiers only in the other
columns; the report text stays in ``raw``.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Column, LargeBinary, Text
from sqlmodel import Field, SQLModel

from ground.clock import utcnow


class Hl7Message(SQLModel, table=True):
    """One received message (every receipt, duplicates included)."""

    __tablename__ = "hl7_message"

    id: int | None = Field(default=None, primary_key=True)
    received_at: datetime = Field(default_factory=utcnow, index=True)
    peer: str = Field(default="", max_length=128, description="host:port of the MLLP client.")
    control_id: str | None = Field(default=None, max_length=64, index=True, description="MSH-10, when readable.")
    message_type: str | None = Field(default=None, max_length=32, description="MSH-9, e.g. ORU^R01.")
    sending_application: str | None = Field(default=None, max_length=128, description="MSH-3.")
    raw: bytes = Field(sa_column=Column(LargeBinary, nullable=False), description="The MLLP payload as received.")
    ack_code: str = Field(default="", max_length=2, description="AA | AE | AR: what we answered ('' until answered).")
    reason: str | None = Field(default=None, sa_column=Column(Text), description="Why it was not accepted.")
    signed_ids: str = Field(default="[]", max_length=256, description="JSON ids of signed_report rows stored.")
    replayed_at: datetime | None = Field(default=None, description="Last replay by `taqrir hl7 --replay`.")
