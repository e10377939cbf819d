"""The ``taqrir`` command as an operator runs it: a real process, real settings from the
environment, a real index (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from sqlalchemy.engine import Engine

from integrations.dicom.ingest import ingest_file
from integrations.dicom.listener import _configure_pydicom
from integrations.dicom.storage import LocalStorage
from tests.conftest import DICOM_DIR

REPO = Path(__file__).resolve().parents[2]


def _taqrir(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "taqrir", *args], check=False, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **env}, cwd=REPO)


def _index(engine: Engine, storage: LocalStorage, path: Path) -> str:
    _configure_pydicom()
    staged = storage.staging_file(delete=False, suffix=".dcm")
    staged.write(path.read_bytes())
    staged.close()
    result = ingest_file(engine=engine, storage=storage, staged=Path(staged.name), calling_ae="PACS")
    return result.headers.study_instance_uid


def test_render_of_nothing_renderable_says_why_writes_provenance_and_fails(
    engine: Engine, db_url: str, tmp_path: Path
) -> None:
    """Item 9: a study whose only image is JPEG XL (no decoder): the reasons, printed and in
    provenance.json, exit status 1, no traceback."""
    storage = LocalStorage(tmp_path / "storage")
    study = _index(engine, storage, DICOM_DIR / "malformed" / "dcm4che_will-jxl.dcm")
    out = tmp_path / "out"
    run = _taqrir("render", study, str(out), env={
        "TAQRIR_DATABASE_URL": db_url, "TAQRIR_STORAGE_URL": storage.root.as_uri(),
        "TAQRIR_DATA_DIR": str(tmp_path / "data")})
    assert run.returncode == 1, run.stdout + run.stderr
    assert "Traceback" not in run.stderr
    assert f"nothing renderable in study {study}" in run.stderr
    assert "unsupported transfer syntax 1.2.840.10008.1.2.4.111" in run.stderr
    prov = json.loads((out / "provenance.json").read_text("utf-8"))
    assert prov["key_images"] == []
    (failure,) = prov["failures"]
    assert "unsupported transfer syntax 1.2.840.10008.1.2.4.111" in failure["reason"]
    assert [d["chosen"] for d in prov["decisions"]] == [True]
    assert not list(out.glob("*.png"))
