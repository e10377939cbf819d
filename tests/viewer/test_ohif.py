"""A real viewer in a real browser: OHIF v3 (npm ``@ohif/app``'s prebuilt ``dist/``) against Orthanc's
DICOMweb plugin, in Debian's headless Chromium driven by puppeteer-core. The draft's SR shows its
English and Arabic text; its encapsulated PDF loads. ``TAQRIR_UPDATE_SCREENSHOTS=1`` copies the
screenshots to docs/ (viewer-sr.png, viewer-pdf.png) for people to look at.

tests/run.sh installs what this needs (tests/viewer: ``npm ci`` for puppeteer-core, ``npm pack``
for OHIF). Run by hand without them, it skips and says why.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine

from tests.conftest import REPO
from tests.factories.drafts import SECTIONS
from tests.factories.ohif import OHIF_DIST, PUPPETEER, VIEWER_DIR, OhifServer
from tests.factories.orthanc import OrthancServer, dicomweb_plugin
from tests.workers.test_export_pipeline import publish_to_pacs

DOCS = REPO / "docs"
SR_CLASS, PDF_CLASS = "1.2.840.10008.5.1.4.1.1.88.22", "1.2.840.10008.5.1.4.1.1.104.1"


def _missing() -> str | None:
    for exe in ("node", "chromium"):
        if shutil.which(exe) is None and not Path(f"/usr/bin/{exe}").exists():
            return f"{exe} is not installed (tests/run.sh installs it)"
    if not (OHIF_DIST / "index.html").is_file():
        return f"OHIF is not unpacked at {OHIF_DIST} (tests/run.sh: npm pack @ohif/app)"
    if not PUPPETEER.is_dir():
        return f"puppeteer-core is not installed in {VIEWER_DIR} (tests/run.sh: npm ci)"
    if dicomweb_plugin() is None:
        return "Orthanc's DICOMweb plugin is not installed (Debian orthanc-dicomweb; tests/run.sh installs it)"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[OrthancServer]:
    server = OrthancServer(tmp_path / "orthanc", aet="PACS", dicomweb=True)
    server.start()
    yield server
    server.stop(kill=True)


def _drive(url: str, shot: Path, mode: str, *expected: str) -> dict[str, Any]:
    proc = subprocess.run(["node", str(VIEWER_DIR / "drive.js"), url, str(shot), mode, *expected],
                          capture_output=True, text=True, timeout=240, cwd=VIEWER_DIR, check=False)
    assert proc.returncode == 0, f"the browser run failed: {proc.stderr[-3000:]}"
    out: dict[str, Any] = json.loads(proc.stdout)
    return out


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_ohif_shows_the_bilingual_sr_and_loads_the_pdf(engine: Engine, tmp_path: Path, pacs: OrthancServer) -> None:
    _draft, rows = publish_to_pacs(engine, tmp_path, pacs)
    assert all(r.state == "sent" for r in rows)
    series = {}
    for r in rows:
        [inst] = pacs.find_instance(r.sop_instance_uid)
        tags = pacs.instance_tags(inst)
        series[tags["SOPClassUID"]] = (tags["StudyInstanceUID"], tags["SeriesInstanceUID"])
    viewer = OhifServer(pacs.url).start()
    try:
        study, sr_series = series[SR_CLASS]
        english = SECTIONS["en"].findings.split(".")[0]  # "The lungs are clear"
        arabic = SECTIONS["ar"].findings.split(".")[0]  # "الرئتان سليمتان"
        shown = _drive(f"{viewer.url}/viewer?StudyInstanceUIDs={study}&initialSeriesInstanceUID={sr_series}",
                       tmp_path / "viewer-sr.png", "sr", english, arabic)
        assert english in shown["text"] and arabic in shown["text"]
        assert SECTIONS["ar"].impression.rstrip(".") in shown["text"]
        assert "research" in shown["text"].lower()  # the series description says what it is
        _, pdf_series = series[PDF_CLASS]
        loaded = _drive(f"{viewer.url}/viewer?StudyInstanceUIDs={study}&initialSeriesInstanceUID={pdf_series}",
                        tmp_path / "viewer-pdf.png", "pdf")
        assert loaded["pdf"]["found"] and loaded["pdf"]["magic"] == "%PDF-" and loaded["pdf"]["bytes"] > 10_000, (
            loaded["pdf"], viewer.requests[-10:])
    finally:
        viewer.stop()
    if os.environ.get("TAQRIR_UPDATE_SCREENSHOTS"):  # refresh docs/ (kept in the repository)
        for name in ("viewer-sr.png", "viewer-pdf.png"):
            shutil.copyfile(tmp_path / name, DOCS / name)
