"""A real PACS (Orthanc, from Debian's packages) routes a study to Taqrir over DICOM."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import Engine
from sqlmodel import select

from ground.db import session_scope
from integrations.dicom.index import Instance, Study
from integrations.dicom.listener import Listener
from tests.conftest import free_port

CORPUS = Path(__file__).resolve().parents[2] / "data" / "dicom"


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[tuple[str, Callable[[int], None]]]:
    exe = shutil.which("Orthanc")
    assert exe, "Orthanc is needed (Debian package orthanc; tests/run.sh installs it)"
    http_port, dicom_port = free_port(), free_port()
    config = tmp_path / "orthanc.json"
    proc: list[subprocess.Popen[bytes]] = []

    def start(taqrir_port: int) -> None:
        config.write_text(json.dumps({
            "Name": "taqrir-test-pacs", "StorageDirectory": str(tmp_path / "orthanc-db"),
            "IndexDirectory": str(tmp_path / "orthanc-db"), "HttpPort": http_port, "DicomPort": dicom_port,
            "DicomAet": "ORTHANC", "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "Plugins": [], "DicomModalities": {"taqrir": ["TAQRIR", "127.0.0.1", taqrir_port]},
        }))
        proc.append(subprocess.Popen([exe, str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{http_port}/system", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise AssertionError("Orthanc did not start")

    yield f"http://127.0.0.1:{http_port}", start
    for p in proc:
        p.terminate()
        p.wait(timeout=10)


def test_orthanc_routes_a_study_to_taqrir(start_listener: Callable[..., Listener], engine: Engine,
                                          orthanc: tuple[str, Callable[[int], None]]) -> None:
    listener = start_listener(allowed_calling_aes=["ORTHANC"])
    base, start = orthanc
    start(listener.port)  # type: ignore[attr-defined]
    files = [*sorted((CORPUS / "mr" / "series_dcm4che_wrist").iterdir()), CORPUS / "ct" / "wg04_CT1" / "CT1_J2KR.dcm"]
    ids = set()
    for f in files:
        r = httpx.post(f"{base}/instances", content=f.read_bytes(), timeout=30)
        assert r.status_code == 200, r.text
        ids.add(r.json()["ParentStudy"])
    assert httpx.post(f"{base}/modalities/taqrir/echo", json={}, timeout=30).status_code == 200
    for study in ids:
        r = httpx.post(f"{base}/modalities/taqrir/store", json={"Resources": [study], "Synchronous": True}, timeout=60)
        assert r.status_code == 200, r.text
    with session_scope(engine) as s:
        rows = s.exec(select(Instance)).all()
        studies = s.exec(select(Study)).all()
    assert len(rows) == len(files)
    assert {r.calling_ae for r in rows} == {"ORTHANC"}
    assert len(studies) == 2
    j2k = next(r for r in rows if r.sop_class_uid == "1.2.840.10008.5.1.4.1.1.2")
    assert j2k.transfer_syntax_uid in ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.1")
