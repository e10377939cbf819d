"""The README's main job, run whole: `taqrir demo` in a folder given by TAQRIR_DATA_DIR, and what
it leaves there checked with independent tools (dciodvfy for the DICOM objects, pdftotext for the
report PDF), as a new user would look at it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pydicom

from tests.conftest import REPO
from tests.reporting.dicom.checks import dciodvfy_errors
from tests.reporting.dicom.pdftext import arabic_column_text, letters

SR, PDF, KOS = "1.2.840.10008.5.1.4.1.1.88.22", "1.2.840.10008.5.1.4.1.1.104.1", "1.2.840.10008.5.1.4.1.1.88.59"


def _source_uid_root(error: str, draft: dict[str, object]) -> bool:
    """dciodvfy's "Illegal root for UID" about a UID the source study carries: the US sample
    (fo-dicom's echo cine) uses the unregistered root 999.999, and the draft's objects must
    reference its study, series and instances by those very UIDs."""
    return "Illegal root for UID" in error and '"999.999.' in error and "999.999." in json.dumps(draft)


def test_the_demo_drafts_six_studies_into_fhir_json_and_dicom_objects(tmp_path: Path) -> None:
    place = tmp_path / "demo-data"
    run = subprocess.run([sys.executable, "-m", "taqrir", "demo"], check=False, capture_output=True, text=True,
                         timeout=300, cwd=REPO, env={**os.environ, "TAQRIR_DATA_DIR": str(place)})
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert f"data: {place}" in run.stdout and "Demo finished" in run.stdout
    # the undecodable study fails on purpose, and says why
    assert "JPEG XL image no decoder can read (fails on purpose): failed: NothingRenderable" in run.stdout
    assert "HTTP 200: searchset Bundle, total=6" in run.stdout
    assert "Not made on this machine" not in run.stdout  # this machine has Pango (tests/run.sh)
    folders = sorted(place.glob("drafts/*/v1"))
    assert len(folders) == 6, folders
    for folder in folders:
        names = {p.name for p in folder.iterdir()}
        assert {"draft.json", "DiagnosticReport.json", "Patient.json", "sr.dcm", "report.pdf",
                "report.pdf.dcm", "kos.dcm"} <= names, (folder, names)
        assert f"{folder}/  sr.dcm, report.pdf, kos.dcm" in run.stdout  # the demo says where they are
        draft = json.loads((folder / "draft.json").read_text("utf-8"))
        report = json.loads((folder / "DiagnosticReport.json").read_text("utf-8"))
        assert report["resourceType"] == "DiagnosticReport" and report["status"] == "partial"
        for name, sop_class in (("sr.dcm", SR), ("report.pdf.dcm", PDF), ("kos.dcm", KOS)):
            errors = [e for e in dciodvfy_errors(folder / name) if not _source_uid_root(e, draft)]
            assert errors == [], (folder, name, errors)
            ds = pydicom.dcmread(folder / name)
            assert ds.SOPClassUID == sop_class
            assert ds.StudyInstanceUID == draft["study"]["study_instance_uid"]
            assert ds.SeriesDescription.startswith("Research only: unverified AI draft")
        assert pydicom.dcmread(folder / "sr.dcm").VerificationFlag == "UNVERIFIED"
        # the PDF a clinician would print carries the draft's Arabic in logical order
        arabic = draft["sections"]["ar"]["impression"]
        assert letters(arabic)[:40] in letters(arabic_column_text(folder / "report.pdf")), folder
