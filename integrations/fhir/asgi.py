"""ASGI entry point for multi-process serving (``uvicorn --factory integrations.fhir.asgi:create``).

Each uvicorn worker process builds its own settings (environment and ``TAQRIR_CONFIG``), engine
and app; ``taqrir api`` uses it when ``api.workers`` > 1.
"""

from __future__ import annotations

from fastapi import FastAPI

from ground.db import make_engine
from taqrir.settings import load_settings
from workers.dicom_objects import store_verified_sr

from .app import create_app


def create() -> FastAPI:
    settings = load_settings()
    return create_app(settings, make_engine(settings.database_url), store_verified_sr=store_verified_sr)
