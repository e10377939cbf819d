"""Connects the listener to drafting: the hand-off of stable studies, and the recovery sweep.

:meth:`Dispatcher.study_stable` is the one function the listener calls for each study that
became stable. With Redis it sends the first task; embedded (``memory://``) it runs the same tasks eagerly on one
background thread, so the listener never waits for a model.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from . import service
from .celery_app import configure, is_embedded
from .config import PipelineSettings
from .context import get_context, set_context
from .tasks import export_task, infer_task, publish_task, render_task

log = logging.getLogger(__name__)


class Dispatcher:
    """Sends pipeline work: Celery messages, or eager runs on a single background thread."""

    def __init__(self, settings: PipelineSettings, ctx: service.PipelineContext | None = None) -> None:
        configure(settings.queue)
        if ctx is not None:
            set_context(ctx)
        self.settings = settings
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="taqrir-drafting") if is_embedded(settings.queue) else None

    def _send(self, fn: Callable[[], object]) -> None:
        if self._pool is None:
            fn()
            return

        def run() -> None:
            try:
                fn()
            except Exception:
                log.exception("embedded pipeline run failed")

        self._pool.submit(run)

    def study_stable(self, study_uid: str, version: int) -> None:
        """The hand-off: stable -> queued, then the render task."""
        if service.enqueue_state(get_context().engine, study_uid, version):
            self._send(lambda: render_task.delay(study_uid, version))

    def resend(self, study_uid: str, version: int, stage: str) -> None:
        task = render_task if stage == "render" else infer_task
        self._send(lambda: task.delay(study_uid, version))

    def republish(self, draft_id: str) -> None:
        self._send(lambda: publish_task.delay(draft_id))

    def export(self, row_id: int) -> None:
        self._send(lambda: export_task.delay(row_id))

    def sweep(self) -> int:
        """Re-enqueue work whose message was lost, and outbox rows whose (re)try is due. Returns
        how many items were sent."""
        studies, drafts = service.stale_work(get_context().engine, older_than_s=self.settings.queue.requeue_after)
        for uid, version, stage in studies:
            log.warning("re-enqueuing %s v%d at %s: no progress for %.0fs", uid, version, stage,
                        self.settings.queue.requeue_after)
            self.resend(uid, version, stage)
        for draft_id in drafts:
            self.republish(draft_id)
        exports = service.due_exports(get_context())
        for row_id in exports:
            self.export(row_id)
        return len(studies) + len(drafts) + len(exports)

    def wait_idle(self) -> None:
        if self._pool is not None:
            self._pool.submit(lambda: None).result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=False)


class Sweeper(threading.Thread):
    """Runs :meth:`Dispatcher.sweep` every ``interval`` seconds until stopped."""

    def __init__(self, dispatcher: Dispatcher, interval: float) -> None:
        super().__init__(name="taqrir-requeue-sweep", daemon=True)
        self.dispatcher = dispatcher
        self.interval = interval
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            try:
                self.dispatcher.sweep()
            except Exception:
                log.exception("re-enqueue sweep failed; retrying next interval")

    def stop(self) -> None:
        self._stop_event.set()
