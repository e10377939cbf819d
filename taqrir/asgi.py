"""ASGI entry point for multi-process serving (``uvicorn --factory taqrir.asgi:create``).

Each uvicorn worker process builds its own settings (environment and ``TAQRIR_CONFIG``), engine
and app; ``taqrir api`` uses it when ``api.workers`` > 1.
"""

from __future__ import annotations

from fastapi import FastAPI

from .settings import load_settings
from .wiring import api_app, open_engine


def create() -> FastAPI:
    settings = load_settings()
    return api_app(settings, open_engine(settings))
