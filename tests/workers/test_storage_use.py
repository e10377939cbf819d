"""What the pipeline keeps in storage: rejected model outputs (for researchers, referenced from the
audit trail) and key-image folders, under keys the pipeline makes from its own identifiers."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

from sqlalchemy.engine import Engine
from sqlmodel import select

from audit.chain import AuditRecord
from ground.db import session_scope
from storage import FileStorage
from workers.service import key_images_folder, record_rejected_output


def test_a_rejected_output_is_stored_and_its_hash_audited(engine: Engine, tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "storage")
    ctx = SimpleNamespace(storage=storage, engine=engine)
    key = record_rejected_output(ctx, "1.2.3", 2, "no Arabic", ["raw one", "نص"])  # type: ignore[arg-type]
    assert key.startswith("rejected/1.2.3/v2-") and key.endswith(".json")
    body = storage.read(key)
    assert json.loads(body) == {"study": "1.2.3", "version": 2, "reason": "no Arabic", "raw_outputs": ["raw one", "نص"]}
    with session_scope(engine) as s:
        rec = s.exec(select(AuditRecord).where(AuditRecord.action == "draft.rejected")).one()
        details = json.loads(rec.details)
    assert details["outputs_key"] == key
    assert details["outputs_sha256"] == hashlib.sha256(body).hexdigest()
    assert list(storage.tmp_dir.iterdir()) == []


def test_key_image_folders_keep_odd_study_uids_inside_storage() -> None:
    assert key_images_folder("1.2.840.1", 3, "abcdef0123") == "keyimages/1.2.840.1/v3-abcdef01"
    odd = key_images_folder("../../etc", 1, "abcdef0123")
    assert odd == f"keyimages/{hashlib.sha1(b'../../etc').hexdigest()}/v1-abcdef01"
