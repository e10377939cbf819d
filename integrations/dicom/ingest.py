"""Store one received instance: parse, hash, make durable, index, audit — in that order.

This is the service function behind the C-STORE handler; it knows nothing of pynetdicom. The
order is what makes an acknowledgement mean something: the file is durable and renamed into place
before the index row and its audit record commit, and only then does the caller answer Success.
A crash before the commit leaves at most an unindexed file that the sender will send again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import Engine

from audit.chain import lock_chain, record
from taqrir.db import session_scope

from .errors import DicomInputError, OutOfResources
from .headers import InstanceHeaders, read_headers
from .index import IndexResult, StoreOutcome, find_instance, index_instance
from .storage import LocalStorage, StoredFile, file_digest, instance_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IngestResult:
    headers: InstanceHeaders
    stored: StoredFile
    outcome: StoreOutcome
    study_version: int
    new_version: bool


def ingest_file(
    *,
    engine: Engine,
    storage: LocalStorage,
    staged: Path,
    calling_ae: str,
    announced_sop_instance_uid: str | None = None,
    announced_sop_class_uid: str | None = None,
    min_free_bytes: int = 0,
) -> IngestResult:
    """Store and index ``staged`` (a complete DICOM file in ``storage``'s filesystem).

    Raises :class:`DicomInputError` subclasses for what the sender must hear about, and
    :class:`OutOfResources`/:class:`StorageFailure` when we cannot store safely. On any error the
    staged file is left for the caller to discard and nothing is indexed.
    """
    size, sha = file_digest(staged)
    if min_free_bytes and storage.free_bytes() - size < min_free_bytes:
        raise OutOfResources(
            f"only {storage.free_bytes() // (1 << 20)} MiB free in {storage.root}, below the "
            f"{min_free_bytes // (1 << 20)} MiB threshold; free space or raise listener.min_free_bytes"
        )
    headers = read_headers(staged)
    if announced_sop_instance_uid and headers.sop_instance_uid != announced_sop_instance_uid:
        from .errors import IdentifiersMissing

        raise IdentifiersMissing(
            f"dataset SOP Instance UID {headers.sop_instance_uid} differs from the announced "
            f"{announced_sop_instance_uid}"
        )
    if announced_sop_class_uid and headers.sop_class_uid != announced_sop_class_uid:
        from .errors import IdentifiersMissing

        raise IdentifiersMissing(
            f"dataset SOP Class UID {headers.sop_class_uid} differs from the announced "
            f"{announced_sop_class_uid}"
        )
    key = instance_key(headers.study_instance_uid, headers.series_instance_uid, headers.sop_instance_uid, sha)
    stored = StoredFile(key=key, size=size, sha256=sha)

    with session_scope(engine) as session:
        # Serialise index writers first: two associations filing the first instances of one
        # patient or study would otherwise race to insert the same rows.
        lock_chain(session)
        existing = find_instance(session, headers.sop_instance_uid)
        if existing is None or existing.sha256 != sha:
            storage.commit(staged, key)
        result: IndexResult = index_instance(
            session, headers=headers, stored=stored, calling_ae=calling_ae, existing=existing
        )
        record(
            session,
            action=f"instance.{result.outcome.value}",
            actor=calling_ae,
            entity_type="Instance",
            entity_id=headers.sop_instance_uid,
            details={
                "study": headers.study_instance_uid,
                "series": headers.series_instance_uid,
                "sop_class": headers.sop_class_uid,
                "transfer_syntax": headers.transfer_syntax_uid,
                "size": size,
                "sha256": sha,
                "study_version": result.study_version,
            },
        )
    if result.obsolete_key:
        storage.remove(result.obsolete_key)
    return IngestResult(headers, stored, result.outcome, result.study_version, result.new_version)


def record_rejection(engine: Engine, *, calling_ae: str, sop_instance_uid: str | None, err: DicomInputError | OutOfResources | Exception, status: int) -> None:
    """Audit a refused instance (its status and reason). Never raises: the listener must answer."""
    try:
        with session_scope(engine) as session:
            record(
                session,
                action="instance.rejected",
                actor=calling_ae,
                entity_type="Instance",
                entity_id=sop_instance_uid or "",
                outcome="failure",
                details={"status": f"0x{status:04X}", "reason": str(err)[:500]},
            )
    except Exception:  # noqa: BLE001 - the DIMSE answer matters more than this record
        log.exception("could not audit a rejected instance")
