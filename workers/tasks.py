"""Celery tasks: a few lines each around :mod:`workers.service`. Payloads are identifiers.

Known errors map to retry or failure here, in one place (:func:`_run`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from celery import Task
from sqlalchemy.exc import OperationalError

from ground.errors import PermanentError, TransientError
from inference.errors import OutputRejected

from . import service
from .celery_app import celery_app
from .context import get_context

log = logging.getLogger(__name__)
T = TypeVar("T")


def _run(task: Task, study_uid: str, version: int, fn: Callable[[], T]) -> T | None:
    ctx = get_context()
    try:
        return fn()
    except service.StudyGone as err:
        log.info("dropping %s for %s v%d: %s", task.name, study_uid, version, err)
        return None
    except OutputRejected as err:
        key = service.record_rejected_output(ctx, study_uid, version, str(err), err.raw_outputs)
        service.fail(ctx.engine, study_uid, version, f"OutputRejected: {err} (model outputs kept at {key})")
        return None
    except PermanentError as err:
        service.fail(ctx.engine, study_uid, version, f"{type(err).__name__}: {err}")
        return None
    except (TransientError, OperationalError) as err:
        retries = task.request.retries
        if retries >= ctx.settings.queue.max_retries:
            service.fail(ctx.engine, study_uid, version,
                         f"gave up after {retries + 1} attempts: {type(err).__name__}: {err}")
            return None
        countdown = ctx.settings.queue.retry_backoff * (2 ** retries)
        log.warning("%s for %s v%d failed (%s); retry %d in %.1fs", task.name, study_uid, version,
                    type(err).__name__, retries + 1, countdown)
        if task.request.is_eager:
            time.sleep(countdown)  # eager retries run at once; keep the backoff anyway
        raise task.retry(exc=err, countdown=countdown, max_retries=ctx.settings.queue.max_retries + 1) from err
    except Exception as err:
        log.exception("%s for %s v%d failed unexpectedly", task.name, study_uid, version)
        service.fail(ctx.engine, study_uid, version, f"unexpected {type(err).__name__}: {err}")
        return None


@celery_app.task(bind=True, name="taqrir.render", acks_late=True, reject_on_worker_lost=True)  # type: ignore[untyped-decorator]  # Celery is untyped
def render_task(self: Task, study_uid: str, version: int) -> None:
    if _run(self, study_uid, version, lambda: service.render_stage(get_context(), study_uid, version)):
        infer_task.delay(study_uid, version)


@celery_app.task(bind=True, name="taqrir.infer", acks_late=True, reject_on_worker_lost=True)  # type: ignore[untyped-decorator]  # Celery is untyped
def infer_task(self: Task, study_uid: str, version: int) -> None:
    draft_id = _run(self, study_uid, version, lambda: service.infer_stage(get_context(), study_uid, version))
    if draft_id:
        publish_task.delay(draft_id)


@celery_app.task(bind=True, name="taqrir.publish", acks_late=True, reject_on_worker_lost=True)  # type: ignore[untyped-decorator]  # Celery is untyped
def publish_task(self: Task, draft_id: str) -> Any:
    try:
        report_id = service.publish_stage(get_context(), draft_id)
        for row_id in service.exports_of_draft(get_context().engine, draft_id):
            export_task.delay(row_id)
        return report_id
    except service.StudyGone as err:
        log.info("publish %s dropped: %s", draft_id, err)
        return None
    except (TransientError, OperationalError) as err:
        settings = get_context().settings
        if self.request.retries >= settings.queue.max_retries:
            return None  # left unpublished: the recovery sweep sends it again later
        raise self.retry(exc=err, countdown=settings.queue.retry_backoff * 2 ** self.request.retries,
                         max_retries=settings.queue.max_retries) from err
    except Exception as err:
        log.exception("publish of %s failed", draft_id)
        service.publish_failed(get_context().engine, draft_id, f"{type(err).__name__}: {err}")
        return None


@celery_app.task(bind=True, name="taqrir.export", acks_late=True, reject_on_worker_lost=True)  # type: ignore[untyped-decorator]  # Celery is untyped
def export_task(self: Task, row_id: int) -> str | None:
    """Deliver one outbox row. Delivery failures are recorded on the row (retried by the sweep when
    due, or dead); a database outage leaves the row to the sweep (lease) rather than retrying here."""
    try:
        return service.export_stage(get_context(), row_id)
    except OperationalError as err:
        log.warning("export of outbox row %d left to the sweep: database unavailable (%s)", row_id, type(err).__name__)
        return None
