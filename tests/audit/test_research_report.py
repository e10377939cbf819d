"""taqrir research report: one self-contained HTML page of plots, with "no data" panels for an
empty export, rendered by a real browser (headless Chromium), and recorded in the audit trail."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image
from pydantic import SecretStr
from sqlalchemy.engine import Engine
from sqlmodel import select
from typer.testing import CliRunner

from audit.chain import AuditRecord, verify
from audit.research.config import ResearchSettings
from audit.research.export import ExportFilter, ResearchError, export
from audit.research.report import write_report
from ground.db import session_scope
from tests.factories import research

SETTINGS = ResearchSettings(pseudonym_key=SecretStr("k" * 40))
PNG = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def _pngs(page: str) -> list[Image.Image]:
    import io

    return [Image.open(io.BytesIO(base64.b64decode(m))) for m in PNG.findall(page)]


def _self_contained(page: str) -> None:
    # nothing fetched from anywhere: no external scripts, styles, images or fonts
    assert not re.search(r'(src|href)="(?!data:)', page)
    assert "<script" not in page and "@import" not in page and "url(" not in page


def test_report_of_a_tiny_export_has_every_plot_and_no_identifiers(engine: Engine, tmp_path: Path) -> None:
    research.build(engine)
    out = tmp_path / "out"
    export(engine, SETTINGS.model_copy(update={"dates": "full"}), out, ExportFilter())
    summary = write_report(engine, out, actor="test")
    page = summary.path.read_text("utf-8")
    _self_contained(page)
    images = _pngs(page)
    assert len(images) == 6 and all(im.format == "PNG" and im.width > 300 for im in images)
    assert page.count("<section>") == 7 and "No data." not in page
    for secret in (research.PATIENT_NAME, research.PATIENT_ID, research.ACCESSION, research.CT_UID, "dr.amal"):
        assert secret not in page
    with session_scope(engine) as s:
        rec = s.exec(select(AuditRecord).where(AuditRecord.action == "research.report")).one()
        assert json.loads(rec.details)["rows"] == 3 and json.loads(rec.details)["sha256"] == summary.sha256
        assert verify(s).ok


def test_empty_export_gives_no_data_panels(engine: Engine, tmp_path: Path) -> None:
    out = tmp_path / "empty"
    export(engine, SETTINGS, out, ExportFilter())
    page = write_report(engine, out).path.read_text("utf-8")
    _self_contained(page)
    assert not _pngs(page) and page.count('class="nodata"') == 6
    assert "No signed reports yet" in page


def test_dates_withheld_say_so(engine: Engine, tmp_path: Path) -> None:
    research.build(engine)
    export(engine, SETTINGS.model_copy(update={"dates": "none"}), tmp_path / "o", ExportFilter())
    page = write_report(engine, tmp_path / "o").path.read_text("utf-8")
    assert "Dates withheld" in page and len(_pngs(page)) == 5


def test_no_export_is_a_clear_error(engine: Engine, tmp_path: Path) -> None:
    with pytest.raises(ResearchError, match="run `taqrir research export"):
        write_report(engine, tmp_path)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Chromium is installed by tests/run.sh")
@pytest.mark.usefixtures("keep_logging")
def test_chromium_renders_the_page(db_url: str, engine: Engine, tmp_path: Path) -> None:
    from taqrir.cli import app

    research.build(engine)
    env = {"TAQRIR_DATABASE_URL": db_url, "TAQRIR_DATA_DIR": str(tmp_path / "data"), "TAQRIR_RESEARCH__DATES": "full"}
    out = tmp_path / "out"
    for args in (["research", "export", str(out)], ["research", "report", str(out)]):
        r = CliRunner().invoke(app, args, env=env)
        assert r.exit_code == 0, r.output
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={shot}", "--window-size=1200,2400", (out / "report.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    im = Image.open(shot).convert("L")
    assert im.size == (1200, 2400)
    # the plots were drawn: the page is far from one flat colour
    hist = im.histogram()
    assert max(hist) < 0.9 * sum(hist)
