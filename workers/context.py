"""The per-process pipeline context used by tasks.

Entry points install one with :func:`set_context`, or a factory with :func:`set_context_factory`
that a process calls on first use: a Celery worker's pool children call it after the fork, so
each process has its own engine and model. The roof (``taqrir.wiring``) supplies both; this room
never reads the settings itself.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from .service import PipelineContext

_lock = threading.Lock()
_context: PipelineContext | None = None
_factory: Callable[[], PipelineContext] | None = None


def set_context(ctx: PipelineContext | None) -> None:
    global _context
    with _lock:
        _context = ctx


def set_context_factory(factory: Callable[[], PipelineContext] | None) -> None:
    """Build the context lazily, in the process that first needs it (``taqrir worker``)."""
    global _factory
    with _lock:
        _factory = factory


def get_context() -> PipelineContext:
    global _context
    with _lock:
        if _context is None:
            if _factory is None:
                raise RuntimeError("no pipeline context in this process: the entry point installs one "
                                   "(set_context or set_context_factory) before tasks run")
            _context = _factory()
        return _context
