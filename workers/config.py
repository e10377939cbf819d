"""Settings of the Celery transport (composed into the roof's settings as ``queue``:
``TAQRIR_QUEUE__BROKER_URL``, ...), and what the pipeline needs of the composed settings."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from pydantic import BaseModel, Field

from inference.config import InferenceSettings
from integrations.dicom.destinations import ExportSettings
from reporting.dicom_config import DicomObjectSettings

from .render_config import RenderSettings


class QueueSettings(BaseModel):
    """Celery transport. ``memory://`` runs tasks in-process (the embedded default)."""

    broker_url: str = Field("memory://", description="Celery broker; redis://127.0.0.1:6379/0 in production.")
    result_backend: str | None = Field(None, description="Celery result backend; None keeps no results.")
    requeue_after: float = Field(
        300.0, gt=0, description="Seconds a queued/running stage may sit before the sweep re-enqueues it."
    )
    max_retries: int = Field(5, ge=0, description="Retries of transient failures before a study fails.")
    retry_backoff: float = Field(2.0, gt=0, description="First retry delay in seconds; doubles each try.")
    shutdown_grace_s: float = Field(
        30.0, ge=0, description="How long `taqrir serve` lets its workers finish running tasks after "
        "SIGTERM/Ctrl-C (Celery warm shutdown) before killing them.",
    )


class ObjectSettings(Protocol):
    """What writing a draft's files and DICOM objects and queueing them for export needs
    (:mod:`workers.dicom_objects`, also called by the FHIR API's review). The roof's composed
    settings satisfy it as they are; a room never imports them (the roof imports the rooms)."""

    @property
    def data_dir(self) -> Path: ...

    @property
    def storage_url(self) -> str: ...

    @property
    def dicom_objects(self) -> DicomObjectSettings: ...

    @property
    def export(self) -> ExportSettings: ...


class PipelineSettings(ObjectSettings, Protocol):
    """The sections and places the drafting pipeline reads (:class:`workers.service.PipelineContext`,
    :class:`workers.pipeline.Dispatcher`): the roof's composed settings, seen through what we use."""

    @property
    def render(self) -> RenderSettings: ...

    @property
    def inference(self) -> InferenceSettings: ...

    @property
    def queue(self) -> QueueSettings: ...
