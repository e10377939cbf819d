"""The one typed settings object: the rooms' sections (each defined in the room that reads it),
composed here, the only place that knows them all.

Built by :func:`load_settings` (never at import time) from, in order of precedence: keyword
overrides, environment variables with the ``TAQRIR_`` prefix (nested sections with ``__``, e.g.
``TAQRIR_LISTENER__PORT=11112``), an optional YAML config file (``TAQRIR_CONFIG`` or the
``config_file`` argument) and the embedded defaults below.
"""

from __future__ import annotations

import os
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from audit.config import AtnaSettings
from audit.research.config import PLACEHOLDER_KEY, ResearchSettings
from ground.errors import ConfigError
from inference.config import InferenceSettings
from integrations.dicom.config import ListenerSettings, StudySettings
from integrations.dicom.destinations import ExportSettings
from integrations.fhir.config import ApiSettings
from integrations.hl7.config import Hl7Settings
from reporting.dicom_config import DicomObjectSettings
from workers.config import QueueSettings
from workers.render_config import RenderSettings


class Settings(BaseSettings):
    """Everything configurable in Taqrir. One instance per process, passed to what needs it."""

    model_config = SettingsConfigDict(
        env_prefix="TAQRIR_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    environment: Literal["development", "production"] = Field(
        "development",
        description="production refuses placeholder secrets (research.pseudonym_key) at start-up.",
    )
    data_dir: Path = Field(Path(".taqrir"), description="Root for the embedded defaults (db, storage, keys).")
    database_url: str = Field("", description="SQLAlchemy URL; empty means a SQLite file in data_dir.")
    storage_url: str = Field("", description="Where instances are stored; empty means data_dir/storage.")
    log_level: str = Field("INFO", description="Python logging level name.")
    log_format: Literal["text", "json"] = Field("text", description="json: one JSON object per line.")
    # Without the pydantic mypy plugin, mypy reads Field(<positional default>) as a required
    # field, so these models look uncallable with no arguments: hence the ignores below.
    listener: ListenerSettings = Field(default_factory=ListenerSettings)  # type: ignore[arg-type]
    study: StudySettings = Field(default_factory=StudySettings)  # type: ignore[arg-type]
    queue: QueueSettings = Field(default_factory=QueueSettings)  # type: ignore[arg-type]
    render: RenderSettings = Field(default_factory=RenderSettings)  # type: ignore[arg-type]
    inference: InferenceSettings = Field(default_factory=InferenceSettings)  # type: ignore[arg-type]
    api: ApiSettings = Field(default_factory=ApiSettings)  # type: ignore[arg-type]
    research: ResearchSettings = Field(default_factory=ResearchSettings)  # type: ignore[arg-type]
    hl7: Hl7Settings = Field(default_factory=Hl7Settings, description="HL7 v2 MLLP receiver (`taqrir hl7`).")
    atna: AtnaSettings = Field(default_factory=AtnaSettings)  # type: ignore[arg-type]
    dicom_objects: DicomObjectSettings = Field(default_factory=DicomObjectSettings)  # type: ignore[arg-type]
    export: ExportSettings = Field(default_factory=ExportSettings)  # type: ignore[arg-type]

    @model_validator(mode="after")
    def _fill_paths(self) -> Settings:
        self.data_dir = Path(self.data_dir).expanduser()
        if not self.database_url:
            self.database_url = f"sqlite:///{(self.data_dir / 'taqrir.db').resolve()}"
        if not self.storage_url:
            self.storage_url = (self.data_dir / "storage").resolve().as_uri()
        if self.environment != "development":
            key = self.research.pseudonym_key.get_secret_value()
            if key == PLACEHOLDER_KEY or len(key) < 32:
                raise ValueError(
                    "research.pseudonym_key is the placeholder or shorter than 32 characters; set "
                    "TAQRIR_RESEARCH__PSEUDONYM_KEY to a long random secret (e.g. `openssl rand -hex 32`)"
                )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _YamlSource(settings_cls))


#: Where the embedded defaults live when nothing says otherwise.
DEFAULT_DATA_DIR = Path(".taqrir")


def with_places(
    settings: Settings,
    *,
    dicom_host: str | None = None,
    dicom_port: int | None = None,
    api_host: str | None = None,
    api_port: int | None = None,
) -> Settings:
    """Apply the command line's ``--dicom-host/--dicom-port/--api-host/--api-port`` (the same
    names in ``listen``, ``api``, ``serve`` and ``demo``) over the settings, which stay the
    defaults. A new API address also moves ``api.base_url`` unless it was configured explicitly
    (a public URL behind a proxy is not ours to change)."""
    if dicom_host is not None:
        settings.listener.host = dicom_host
    if dicom_port is not None:
        settings.listener.port = dicom_port
    if api_host is None and api_port is None:
        return settings
    derived = settings.api.base_url == f"http://{settings.api.host}:{settings.api.port}/fhir" or (
        "base_url" not in settings.api.model_fields_set)
    if api_host is not None:
        settings.api.host = api_host
    if api_port is not None:
        settings.api.port = api_port
    if derived:
        shown = "127.0.0.1" if settings.api.host in ("0.0.0.0", "::", "") else settings.api.host
        settings.api.base_url = f"http://{shown}:{settings.api.port}/fhir"
    return settings


_CONFIG_FILE: ContextVar[Path | None] = ContextVar("taqrir_config_file", default=None)


class _YamlSource(PydanticBaseSettingsSource):
    """Reads the YAML file named by ``TAQRIR_CONFIG`` (lowest precedence above defaults)."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = _CONFIG_FILE.get() or os.environ.get("TAQRIR_CONFIG")
        if not path:
            return {}
        return _read_yaml(Path(path))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError as err:
        raise ConfigError(f"config file {path} does not exist; fix TAQRIR_CONFIG or --config") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings at its top level")
    return data


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build the settings. ``config_file`` wins over ``TAQRIR_CONFIG``; ``overrides`` win over all."""
    token = _CONFIG_FILE.set(config_file)
    try:
        return Settings(**overrides)
    finally:
        _CONFIG_FILE.reset(token)
