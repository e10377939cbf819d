"""Delivering outbox rows: claim, C-STORE, record the result (the service under the ``export`` task).

Each call handles the rows it is given, grouped by destination, one association per destination;
a destination that is down or refuses us affects only its own rows. Every attempt and result is
in the audit trail (:mod:`.outbox` records them); a worker killed mid-send leaves its rows
``sending``, and the sweep sends them again after ``export.sending_lease`` with the same SOP
Instance UIDs, which the PACS stores once.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import Engine

from ground.db import session_scope

from .destinations import ExportSettings
from .outbox import (
    CommitmentState,
    OutboxItem,
    OutboxState,
    claim,
    mark_dead,
    mark_failed,
    mark_sent,
    note_commitment_requested,
)
from .scu import (
    ExportError,
    PermanentExportError,
    SendItem,
    SendResult,
    TransientExportError,
    new_transaction_uid,
    request_commitment,
    send_files,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Delivered:
    """What became of one row in this call."""

    row_id: int
    destination: str
    state: OutboxState
    reason: str = ""


def deliver(engine: Engine, settings: ExportSettings, rows: Sequence[int], *,
            storage_root: Path | None = None) -> list[Delivered]:
    """Send these outbox rows (those that are due and not held by another worker). Never raises
    for a delivery failure: the failure is recorded on the row and returned."""
    claimed: list[OutboxItem] = []
    with session_scope(engine) as s:
        for row_id in rows:
            row = claim(s, row_id, lease_s=settings.sending_lease)
            if row is not None:
                claimed.append(row)
    by_dest: dict[str, list[OutboxItem]] = defaultdict(list)
    for row in claimed:
        by_dest[row.destination].append(row)
    if len(by_dest) <= 1:
        return [d for name, group in by_dest.items() for d in _deliver_group(engine, settings, name, group, storage_root)]
    # One thread per destination: a PACS that hangs until its timeouts never delays another.
    with ThreadPoolExecutor(len(by_dest), thread_name_prefix="taqrir-export") as pool:
        futures = [pool.submit(_deliver_group, engine, settings, name, group, storage_root)
                   for name, group in by_dest.items()]
        return [d for f in futures for d in f.result()]


def _deliver_group(engine: Engine, settings: ExportSettings, name: str, rows: list[OutboxItem],
                   storage_root: Path | None) -> list[Delivered]:
    dest = settings.destination(name)
    results: dict[int, SendResult | ExportError] = {}
    sendable: list[tuple[OutboxItem, SendItem]] = []
    for row in rows:
        assert row.id is not None
        path = row.path(storage_root)
        if dest is None:
            results[row.id] = PermanentExportError(
                f"destination {name!r} is no longer in export.destinations; add it back, then `taqrir outbox retry`")
        elif not path.is_file():
            results[row.id] = PermanentExportError(
                f"object file {path} is missing; re-publish the draft (`taqrir redraft`), then `taqrir outbox retry`")
        else:
            sendable.append((row, SendItem(path, row.sop_class_uid, row.sop_instance_uid)))
    t0 = time.perf_counter()
    if sendable and dest is not None:
        try:
            for (row, _), answered in zip(sendable, send_files(dest, settings, [i for _, i in sendable]), strict=True):
                assert row.id is not None
                results[row.id] = answered
        except ExportError as err:
            for row, _ in sendable:
                assert row.id is not None
                results[row.id] = err
        except Exception as err:  # an unforeseen error is recorded and retried, never lost
            log.exception("sending to %s failed unexpectedly", name)
            for row, _ in sendable:
                assert row.id is not None
                results[row.id] = TransientExportError(f"unexpected {type(err).__name__}: {err}")
    send_s = time.perf_counter() - t0
    commitment: tuple[CommitmentState, str | None] | None = None
    ok: list[tuple[OutboxItem, SendItem]] = []
    for row, item in sendable:
        answer = results[row.id or 0]
        if isinstance(answer, SendResult) and answer.error is None:
            ok.append((row, item))
    if dest is not None and dest.storage_commitment and ok:
        commitment = _ask_commitment(engine, dest.name, settings, ok)
    out = []
    with session_scope(engine) as s:
        for row in rows:
            assert row.id is not None
            res = results[row.id]
            failure = res if isinstance(res, ExportError) else res.error
            if failure is None:
                assert isinstance(res, SendResult)
                mark_sent(s, row, status=res.status or 0, comment=res.comment,
                          commitment=commitment[0] if commitment else None,
                          commitment_uid=commitment[1] if commitment else None)
                out.append(Delivered(row.id, name, OutboxState.sent))
            elif isinstance(failure, PermanentExportError):
                mark_dead(s, row, reason=str(failure), status=failure.status)
                out.append(Delivered(row.id, name, OutboxState.dead, str(failure)))
            else:
                state = mark_failed(s, row, reason=str(failure), status=failure.status,
                                    retry_in_s=settings.backoff(row.attempts),
                                    give_up_after_s=settings.give_up_after)
                out.append(Delivered(row.id, name, state, str(failure)))
    sent = sum(d.state is OutboxState.sent for d in out)
    log.info("export to %s: %d sent, %d not (%.3fs)", name, sent, len(out) - sent, send_s)
    return out


def _ask_commitment(engine: Engine, name: str, settings: ExportSettings,
                    sent: list[tuple[OutboxItem, SendItem]]) -> tuple[CommitmentState, str | None]:
    """N-ACTION for the sent objects. The transaction UID is on the rows before the request goes
    out: the PACS may report back (to the listener) before the N-ACTION response arrives."""
    dest = settings.destination(name)
    assert dest is not None
    transaction_uid = new_transaction_uid()
    with session_scope(engine) as s:
        note_commitment_requested(s, [row.id or 0 for row, _ in sent], transaction_uid)
    try:
        request_commitment(dest, settings, [item for _, item in sent], transaction_uid)
    except PermanentExportError as err:
        log.warning("storage commitment to %s refused: %s", name, err)
        return CommitmentState.unsupported, transaction_uid
    except ExportError as err:
        log.warning("storage commitment to %s failed: %s", name, err)
        return CommitmentState.failed, transaction_uid
    return CommitmentState.requested, transaction_uid
