"""The one place that builds Taqrir's long-running parts from the composed settings.

``taqrir listen``, ``taqrir serve``, ``taqrir api``, ``taqrir worker``, the demo, the ASGI
factory and ``bench/pipeline.py`` all build what they run here, so that a part is wired the same
way wherever it runs. The rooms get only their own sections and plain values; this module is the
only one that knows which section goes where.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field

import uvicorn
from fastapi import FastAPI, Response
from sqlalchemy.engine import Engine

from audit.atna import AtnaSource
from audit.ship import AtnaShipper
from ground.db import make_engine, upgrade
from ground.migrations import require_current
from integrations.dicom.listener import Listener
from integrations.dicom.signed_sr import SignedSrReader
from integrations.fhir.app import create_app
from storage import open_storage
from workers.context import set_context_factory
from workers.dicom_objects import store_verified_sr
from workers.metrics import render_metrics
from workers.pipeline import Dispatcher, Sweeper
from workers.service import PipelineContext

from .settings import Settings, load_settings


def open_engine(settings: Settings) -> Engine:
    """The engine of ``database_url``, refusing a schema that is not at head
    (:class:`~ground.errors.SchemaNotCurrent`: run ``taqrir db upgrade``). Nothing but
    :func:`migrated_engine` changes the schema."""
    engine = make_engine(settings.database_url)
    try:
        require_current(engine)
    except BaseException:
        engine.dispose()
        raise
    return engine


def migrated_engine(settings: Settings) -> Engine:
    """The engine of ``database_url`` after migrating it to head: ``taqrir db upgrade`` and the
    demo (which owns its scratch database) only."""
    engine = make_engine(settings.database_url)
    upgrade(engine)
    return engine


def pipeline_context(settings: Settings, engine: Engine) -> PipelineContext:
    return PipelineContext.from_settings(settings, engine)


def worker_context() -> PipelineContext:
    """A task process's own settings (environment and ``TAQRIR_CONFIG``), engine and context."""
    settings = load_settings()
    return pipeline_context(settings, open_engine(settings))


def install_worker_context() -> None:
    """For ``taqrir worker``: each process that runs tasks (Celery's pool children, after the
    fork) builds its own context with :func:`worker_context` on first use."""
    set_context_factory(worker_context)


def dispatcher(settings: Settings, engine: Engine, ctx: PipelineContext | None = None) -> Dispatcher:
    """The hand-off to drafting (Celery messages, or the embedded in-process queue)."""
    return Dispatcher(settings, ctx or pipeline_context(settings, engine))


def atna_shipper(settings: Settings, engine: Engine) -> AtnaShipper:
    """The ATNA sender for ``settings.atna`` (see audit/ship.py)."""
    source = AtnaSource(source_id=settings.listener.ae_title, enterprise_site=settings.atna.enterprise_site,
                        base_url=settings.api.base_url, hostname=settings.atna.hostname or socket.getfqdn(),
                        app_name=settings.atna.app_name)
    return AtnaShipper(settings.atna, engine, source)


def atna_sender(settings: Settings, engine: Engine) -> AtnaShipper | None:
    """The ATNA sender that runs beside ``listen`` and ``serve``, when ``atna.enabled`` (not started)."""
    return atna_shipper(settings, engine) if settings.atna.enabled else None


@dataclass
class Receiving:
    """The listener with what runs beside it: the dispatcher it hands stable studies to, the
    signed-SR reader, the re-enqueue sweeper and the ATNA sender (each optional)."""

    listener: Listener
    dispatcher: Dispatcher
    signed_srs: SignedSrReader | None
    sweep_every: float | None
    atna: AtnaShipper | None
    sweeper: Sweeper | None = field(default=None, init=False)
    port: int = field(default=0, init=False)

    def start(self) -> int:
        """Start listening (then the rest); returns the bound DICOM port."""
        self.port = self.listener.start()
        if self.signed_srs is not None:
            self.signed_srs.recover()
        if self.sweep_every is not None:
            self.sweeper = Sweeper(self.dispatcher, self.sweep_every)
            self.sweeper.start()
        if self.atna is not None:
            self.atna.start()
        return self.port

    def stop_background(self) -> None:
        """Stop the sweeper and the ATNA sender (the listener has stopped or is stopping)."""
        if self.sweeper is not None:
            self.sweeper.stop()
        if self.atna is not None:
            self.atna.stop()

    def close(self) -> None:
        """Stop everything, then let the embedded queue finish what it runs."""
        self.stop_background()
        self.listener.stop()
        self.dispatcher.close()


def receiving(settings: Settings, engine: Engine, *, ctx: PipelineContext | None = None, signed_srs: bool = True,
              sweep_every: float | None = -1.0, atna: bool = True) -> Receiving:
    """Build (not start) the listener and its companions. ``sweep_every``: seconds between
    re-enqueue sweeps; -1 means four stability sweep intervals, None no sweeper. ``atna`` starts
    the ATNA sender only when ``atna.enabled``."""
    storage = open_storage(settings.storage_url)
    hand_to = dispatcher(settings, engine, ctx)
    reader = SignedSrReader(engine, storage) if signed_srs else None  # verified SRs from the reporting system
    listener = Listener(settings=settings.listener, study_settings=settings.study, engine=engine, storage=storage,
                        handoff=hand_to.study_stable, after_store=reader)
    every = settings.study.sweep_interval * 4 if sweep_every == -1.0 else sweep_every
    shipper = atna_sender(settings, engine) if atna else None
    return Receiving(listener=listener, dispatcher=hand_to, signed_srs=reader, sweep_every=every, atna=shipper)


def api_app(settings: Settings, engine: Engine, *, metrics: bool = False) -> FastAPI:
    """The FHIR API; with ``metrics``, the pipeline's Prometheus metrics at ``/metrics`` too."""
    app = create_app(settings, engine, store_verified_sr=store_verified_sr)
    if metrics:
        @app.get("/metrics", include_in_schema=False)
        def _metrics() -> Response:
            return Response(render_metrics(engine), media_type="text/plain; version=0.0.4")
    return app


@dataclass
class ApiThread:
    """A uvicorn server running an app in a background thread."""

    server: uvicorn.Server
    thread: threading.Thread

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=timeout)


def start_api(app: FastAPI, *, host: str, port: int, log_level: str, wait_s: float = 0.0) -> ApiThread:
    """Serve ``app`` in a daemon thread; wait up to ``wait_s`` seconds for it to accept."""
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False))
    thread = threading.Thread(target=server.run, name="api", daemon=True)
    thread.start()
    deadline = time.monotonic() + wait_s
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    return ApiThread(server, thread)
