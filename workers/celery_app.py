"""The Celery application. Created unconfigured at import (no connection, no settings);
:func:`configure` applies the settings in each entry point.

Queues let hosts specialise: ``render`` (CPU), ``infer`` (GPU hosts or hosts near the SGLang
server), ``publish`` (I/O), ``export`` (C-STORE of draft objects to PACS destinations).
Reliability choices: tasks acknowledge late and are rejected (so redelivered) when their worker dies; a worker prefetches one message at a time. The database,
not the broker, is the source of truth: a sweep re-enqueues work whose message was lost
(:func:`workers.service.stale_work`). ``memory://`` runs the same tasks eagerly in-process, for
the embedded demo that needs no server.
"""

from __future__ import annotations

from celery import Celery

from .config import QueueSettings

QUEUES = ("render", "infer", "publish", "export")

celery_app = Celery("taqrir", include=["workers.tasks"])


def is_embedded(queue: QueueSettings) -> bool:
    return queue.broker_url.startswith("memory://")


def configure(queue: QueueSettings) -> Celery:
    """Apply the queue settings to the app (idempotent)."""
    eager = is_embedded(queue)
    if celery_app.conf.broker_url not in (None, queue.broker_url):
        # Connections and producers are pooled per broker: drop those of the old one.
        celery_app.close()
        celery_app.amqp._producer_pool = None
        celery_app._pool = None
    celery_app.conf.update(
        broker_url=queue.broker_url,
        result_backend=queue.result_backend,
        task_ignore_result=queue.result_backend is None,
        task_always_eager=eager,
        task_eager_propagates=False,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        task_default_queue="render",
        task_routes={
            "taqrir.render": {"queue": "render"},
            "taqrir.infer": {"queue": "infer"},
            "taqrir.publish": {"queue": "publish"},
            "taqrir.export": {"queue": "export"},
        },
        # Unacked messages come back after this on Redis; the DB sweep usually acts first.
        broker_transport_options={"visibility_timeout": max(int(queue.requeue_after) * 2, 60)},
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_serializer="json",
        accept_content=["json"],
    )
    return celery_app
