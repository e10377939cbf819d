"""Study stability: a study is *stable* when nothing has arrived for ``stable_after`` seconds.

Derived only from timestamps in the database, so it survives a listener restart and works with
several listener processes: each transition is the lifecycle's compare-and-set
(:func:`.lifecycle.transition`), which exactly one sweeper wins.
Stable studies are handed to drafting through one callable (the pipeline connects it to Celery).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy.engine import Engine
from sqlmodel import col, select

from ground.clock import utcnow
from ground.db import session_scope

from .index import Study
from .lifecycle import StudyEvent, StudyState, transition

log = logging.getLogger(__name__)

#: Receives (study_instance_uid, version) for each study that just became stable.
Handoff = Callable[[str, int], None]


def sweep_stable(engine: Engine, *, stable_after: float, handoff: Handoff, now: datetime | None = None) -> list[tuple[str, int]]:
    """Mark every quiet ``receiving`` study ``stable`` (audited) and hand each to drafting."""
    cutoff = (now or utcnow()) - timedelta(seconds=stable_after)
    became: list[tuple[str, int]] = []
    with session_scope(engine) as session:
        candidates = session.exec(
            select(Study.id, Study.study_instance_uid, Study.version).where(
                col(Study.state) == StudyState.receiving.value, col(Study.last_received_at) <= cutoff
            )
        ).all()
    for pk, uid, version in candidates:
        with session_scope(engine) as session:
            # receiving -> stable unless an instance arrived since (the cutoff), audited
            if not transition(session, study_pk=pk or 0, study_uid=uid, version=version, event=StudyEvent.quiet,
                              actor="taqrir", received_before=cutoff, details={"stable_after_s": stable_after}):
                continue
        became.append((uid, version))
    for uid, version in became:
        try:
            handoff(uid, version)
        except Exception:
            log.exception("hand-off of study %s v%d failed; the pipeline sweep will retry", uid, version)
    return became


def log_handoff(study_uid: str, version: int) -> None:
    """The hand-off used when no pipeline is connected: just say so."""
    log.info("study %s version %d is stable (no drafting pipeline connected)", study_uid, version)
