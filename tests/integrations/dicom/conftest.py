from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine

from integrations.dicom.config import ListenerSettings, StudySettings
from integrations.dicom.listener import Listener
from storage import FileStorage
from tests.factories.dcmtk import require_dcmtk


@pytest.fixture(scope="session", autouse=True)
def _dcmtk() -> None:
    require_dcmtk()


@pytest.fixture
def start_listener(engine: Engine, tmp_path: Path) -> Iterator[Callable[..., Listener]]:
    """Start an in-process listener on a free port; stopped after the test."""
    started: list[Listener] = []

    def _start(handoff: Any = None, study: StudySettings | None = None, **overrides: Any) -> Listener:
        settings = ListenerSettings(**{"host": "127.0.0.1", "port": 0, "min_free_bytes": 0, **overrides})
        listener = Listener(
            settings=settings,
            study_settings=study or StudySettings(stable_after=3600, sweep_interval=3600),
            engine=engine,
            storage=FileStorage(tmp_path / "storage"),
            **({"handoff": handoff} if handoff else {}),
        )
        listener.port = listener.start()  # type: ignore[attr-defined]
        started.append(listener)
        return listener

    yield _start
    for listener in started:
        listener.stop()
