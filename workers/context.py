"""The per-process pipeline context used by tasks.

Entry points install one with :func:`set_context`; a Celery worker child that has none builds it
from settings on first use (after the fork, so each process has its own engine and model).
"""

from __future__ import annotations

import threading

from ground.db import make_engine, upgrade
from taqrir.settings import load_settings

from .service import PipelineContext

_lock = threading.Lock()
_context: PipelineContext | None = None


def set_context(ctx: PipelineContext | None) -> None:
    global _context
    with _lock:
        _context = ctx


def get_context() -> PipelineContext:
    global _context
    with _lock:
        if _context is None:
            settings = load_settings()
            engine = make_engine(settings.database_url)
            upgrade(engine)
            _context = PipelineContext.from_settings(settings, engine)
        return _context
