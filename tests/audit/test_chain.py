from __future__ import annotations

import io
import json

from sqlalchemy import text
from sqlalchemy.engine import Engine

from audit.chain import export_jsonl, record, verify
from taqrir.db import session_scope


def test_chain_records_verify_and_detect_tampering(engine: Engine) -> None:
    with session_scope(engine) as s:
        for i in range(5):
            record(s, action="instance.stored", actor="MODALITY", entity_type="Instance",
                   entity_id=f"1.2.3.{i}", details={"size": i, "عربي": "نص"})
    with session_scope(engine) as s:
        v = verify(s)
        assert v.ok and v.checked == 5
        buf = io.StringIO()
        assert export_jsonl(s, buf) == 5
        lines = [json.loads(x) for x in buf.getvalue().splitlines()]
        assert lines[1]["prev_hash"] == lines[0]["hash"]
    with engine.begin() as conn:
        conn.execute(text("UPDATE audit_event SET actor = 'MALLORY' WHERE seq = 3"))
    with session_scope(engine) as s:
        v = verify(s)
        assert not v.ok and v.first_bad_seq == 3
    with engine.begin() as conn:
        conn.execute(text("UPDATE audit_event SET actor = 'MODALITY' WHERE seq = 3"))
        conn.execute(text("DELETE FROM audit_event WHERE seq = 4"))
    with session_scope(engine) as s:
        v = verify(s)
        assert not v.ok and v.first_bad_seq == 5


def test_rolled_back_transaction_leaves_no_record(engine: Engine) -> None:
    try:
        with session_scope(engine) as s:
            record(s, action="x", actor="y")
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    with session_scope(engine) as s:
        assert verify(s).checked == 0
