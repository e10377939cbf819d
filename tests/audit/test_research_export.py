"""taqrir research export: one de-identified row per draft version, Parquet + JSON Lines that load
in pandas as documented, the data dictionary, filters, the date policy, the audit record
(SQLite and PostgreSQL)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from pydantic import SecretStr
from sqlalchemy.engine import Engine
from sqlmodel import select
from typer.testing import CliRunner

from audit.chain import AuditRecord, verify
from audit.research.columns import NAMES, SCHEMA, dictionary_markdown
from audit.research.config import ResearchSettings
from audit.research.deid import Deidentifier, age_years
from audit.research.export import ExportFilter, ResearchError, export, parse_since
from ground.db import session_scope
from tests.conftest import REPO
from tests.factories import research

KEY = SecretStr("k" * 40)


def _settings(**kw: object) -> ResearchSettings:
    return ResearchSettings.model_validate({"pseudonym_key": KEY, "reviewer_roles": {"dr.amal": "radiologist"}, **kw})


def test_export_rows_load_in_pandas_with_every_column_and_no_identifiers(engine: Engine, tmp_path: Path) -> None:
    scenario = research.build(engine)
    out = tmp_path / "out"
    summary = export(engine, _settings(batch_rows=10), out, ExportFilter(), actor="test")
    assert summary.rows == 3
    df = pd.read_parquet(out / "drafts.parquet")  # as docs/research-export.md says
    assert list(df.columns) == list(NAMES) and len(df) == 3
    assert pq.read_schema(out / "drafts.parquet").equals(SCHEMA, check_metadata=False)
    js = pd.read_json(out / "drafts.jsonl", lines=True, dtype=False)
    assert list(js.columns) == list(NAMES) and sorted(js["draft_pseudonym"]) == sorted(df["draft_pseudonym"])
    # nothing that identifies anyone, in either file
    raw = (out / "drafts.jsonl").read_text("utf-8") + df.to_json(force_ascii=False)
    for secret in (research.PATIENT_NAME, "HADDAD", research.PATIENT_ID, research.ACCESSION, research.CT_UID,
                   research.MR_UID, "1961", "dr.amal", "Dr Amal", scenario.ct_draft_v2, scenario.report_id):
        assert secret not in raw, secret
    by_version = df.set_index("study_version")
    ct2 = df[(df["modality"] == "CT") & (df["study_version"] == 2)].iloc[0]
    ct1 = df[(df["modality"] == "CT") & (df["study_version"] == 1)].iloc[0]
    mr = df[df["modality"] == "MR"].iloc[0]
    del by_version
    # identity: the same study and patient across versions, distinct drafts
    assert ct1["study_pseudonym"] == ct2["study_pseudonym"] and ct1["patient_pseudonym"] == ct2["patient_pseudonym"]
    assert ct1["draft_pseudonym"] != ct2["draft_pseudonym"] and bool(ct1["superseded"]) and not ct2["superseded"]
    # study metadata: year only by default, age in years, sex
    assert ct2["study_date"] == "2026" and ct2["drafted_at"] == "2026" and ct2["patient_age_years"] == 65
    assert ct2["patient_sex"] == "F" and ct2["series_count"] == 1 and ct2["instance_count"] == 3
    # provenance, images, timing
    assert ct2["model_name"] == "BiMediX2-8B" and ct2["prompt_template_id"] == "radiology-bilingual-v1"
    assert len(ct2["prompt_template_sha256"]) == 64 and ct2["key_image_count"] == 2
    assert list(ct2["key_image_labels"]) == ["image 1", "image 2"] and len(ct2["key_image_sha256"][0]) == 64
    assert ct2["temperature"] == 0.0 and ct2["max_new_tokens"] == 1024 and json.loads(ct2["sampling_json"])
    assert ct2["prompt_tokens"] == 812 and ct2["infer_s"] == 3.5 and ct2["arrival_to_draft_s"] == 540.0
    # checks
    assert ct2["consistent"] and ct2["consistency_source"] == "stored" and ct2["guard_model_calls"] == 3
    assert not mr["consistent"] and mr["consistency_source"] == "recomputed"
    assert "laterality" in list(mr["consistency_kinds"]) and pd.isna(mr["guard_passed"])
    # review, signed text, deltas
    assert ct2["review_outcome"] == "edited" and ct2["reviewer_role"] == "radiologist"
    assert len(ct2["reviewer_pseudonym"]) == 32 and ct2["arrival_to_review_s"] > 0  # when the review was recorded
    assert ct2["signed_status"] == "final" and ct2["signed_source"] == "hl7"
    assert ct2["signed_en_text"].startswith("Small left pleural effusion.") and "اليسرى" in ct2["signed_ar_text"]
    assert 0 < ct2["en_percent_edited"] <= 100 and 0 <= ct2["ar_char_edit_distance"] < 1
    assert ct2["arrival_to_signature_s"] == 10800.0
    assert ct1["review_outcome"] == "none" and pd.notna(ct1["en_chrf"])  # v1 compared with the signed text too
    assert mr["review_outcome"] == "none" and pd.isna(mr["signed_status"]) and pd.isna(mr["en_bleu"])
    assert ct2["en_findings"] == research.CT_TEXT["en"].findings and ct2["ar_impression"] == research.CT_TEXT["ar"].impression
    # the dictionary beside it, the manifest, the audit record
    assert dictionary_markdown() in (out / "data-dictionary.md").read_text("utf-8")
    manifest = json.loads((out / "manifest.json").read_text("utf-8"))
    assert manifest["rows"] == 3 and set(manifest["files"]) == {"drafts.parquet", "drafts.jsonl", "data-dictionary.md"}
    with session_scope(engine) as s:
        rec = s.exec(select(AuditRecord).where(AuditRecord.action == "research.export")).one()
        assert rec.actor == "test" and json.loads(rec.details)["rows"] == 3 and rec.entity_id == summary.export_id
        assert verify(s).ok
    assert not list(out.glob(".*.tmp"))


def test_pseudonyms_are_keyed_and_stable(engine: Engine, tmp_path: Path) -> None:
    research.build(engine)
    a = export(engine, _settings(), tmp_path / "a", ExportFilter())
    b = export(engine, _settings(), tmp_path / "b", ExportFilter())
    c = export(engine, _settings(pseudonym_key=SecretStr("z" * 40)), tmp_path / "c", ExportFilter())
    cols = ["draft_pseudonym", "study_pseudonym", "patient_pseudonym"]
    da, db, dc = (pd.read_parquet(x.out_dir / "drafts.parquet")[cols] for x in (a, b, c))
    assert da.equals(db)
    assert not set(da["patient_pseudonym"]) & set(dc["patient_pseudonym"])


@pytest.mark.parametrize("policy", ["none", "year", "shifted", "full"])
def test_date_policy(engine: Engine, tmp_path: Path, policy: str) -> None:
    research.build(engine)
    export(engine, _settings(dates=policy, include_text=False), tmp_path / "o", ExportFilter())
    df = pd.read_parquet(tmp_path / "o" / "drafts.parquet")
    ct = df[df["modality"] == "CT"].sort_values("study_version")
    dates = ct["study_date"].tolist()
    if policy == "none":
        assert df[["study_date", "drafted_at", "reviewed_at", "signed_at"]].isna().all().all()
    elif policy == "year":
        assert dates == ["2026", "2026"]
    elif policy == "full":
        assert dates == ["2026-11-03", "2026-11-03"] and ct["drafted_at"].iloc[1].startswith("2026-11-03T09:09")
    else:
        shifted = pd.to_datetime(ct["study_date"].iloc[0])
        assert shifted != pd.Timestamp("2026-11-03") and abs((shifted - pd.Timestamp("2026-11-03")).days) <= 365
        # intervals within a patient are kept
        drafted = pd.to_datetime(ct["drafted_at"], format="ISO8601")
        assert (drafted.iloc[1] - drafted.iloc[0]).total_seconds() == 360
    assert (df[["en_findings", "ar_findings", "signed_en_text", "signed_ar_text"]] == "").all().all()
    assert ct["arrival_to_review_s"].iloc[1] > 0 and ct["arrival_to_signature_s"].iloc[1] == 10800.0  # durations kept


def test_filters(engine: Engine, tmp_path: Path) -> None:
    research.build(engine)
    assert export(engine, _settings(), tmp_path / "mr", ExportFilter(modality="mr")).rows == 1
    since = parse_since("2026-11-10")
    assert export(engine, _settings(), tmp_path / "since", ExportFilter(since=since)).rows == 1  # the MR, day 20
    assert export(engine, _settings(), tmp_path / "none", ExportFilter(modality="US")).rows == 0
    empty = pd.read_parquet(tmp_path / "none" / "drafts.parquet")
    assert list(empty.columns) == list(NAMES) and empty.empty
    with pytest.raises(ResearchError, match="already holds an export"):
        export(engine, _settings(), tmp_path / "mr", ExportFilter())
    with pytest.raises(ResearchError, match="not an ISO date"):
        parse_since("last tuesday")


@pytest.mark.usefixtures("keep_logging")
def test_cli_export_and_the_placeholder_key(db_url: str, engine: Engine, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from taqrir.cli import app

    research.build(engine)
    env = {"TAQRIR_DATABASE_URL": db_url, "TAQRIR_DATA_DIR": str(tmp_path / "data")}
    r = CliRunner().invoke(app, ["research", "export", str(tmp_path / "x"), "--modality", "CT"], env=env)
    assert r.exit_code == 0, r.output
    assert "exported 2 draft versions" in r.output
    r = CliRunner().invoke(app, ["research", "export", str(tmp_path / "y")],
                           env={**env, "TAQRIR_ENVIRONMENT": "production"})
    assert r.exit_code != 0 and "pseudonym_key" in str(r.exception)


def test_a_terminal_sees_the_progress_bar_and_a_pipe_does_not(db_url: str, engine: Engine, tmp_path: Path) -> None:
    """The long-export progress bar, seen as a user sees it: `taqrir research export` with its
    stderr on a pseudo-terminal, and again with stderr a pipe (scripts and cron get no bar)."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import sys
    import termios

    research.build(engine)
    env = {**os.environ, "TAQRIR_DATABASE_URL": db_url, "TAQRIR_DATA_DIR": str(tmp_path / "data")}
    command = [sys.executable, "-m", "taqrir", "research", "export"]
    leader, follower = pty.openpty()
    # a terminal of 100 columns (a pty starts at 0x0, where tqdm's dynamic width draws nothing)
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    try:
        proc = subprocess.run([*command, str(tmp_path / "tty")], env=env, stdout=subprocess.PIPE,
                              stderr=follower, timeout=120, check=False, cwd=REPO)
        os.close(follower)
        shown = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the pty is drained and closed
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(leader)
    assert proc.returncode == 0, proc.stdout
    rows = int(proc.stdout.decode().split("exported ")[1].split()[0])
    bar = shown.decode("utf-8", "replace")
    assert rows > 0 and "research export: 100%|" in bar and f"{rows}/{rows}" in bar and "rows/s" in bar, bar
    piped = subprocess.run([*command, str(tmp_path / "pipe")], env=env, capture_output=True, text=True,
                           timeout=120, check=False, cwd=REPO)
    assert piped.returncode == 0, piped.stderr
    assert "%|" not in piped.stderr and "rows/s" not in piped.stderr, piped.stderr  # no bar, the log line only


def test_deidentifier_parts() -> None:
    d = Deidentifier(b"k" * 32, "shifted", 30)
    assert d.pseudonym("patient", "", "P1") == d.pseudonym("patient", "", "P1") != d.pseudonym("study", "", "P1")
    assert all(-30 <= d.shift_days(f"p{i}") <= 30 for i in range(200))
    assert len({d.shift_days(f"p{i}") for i in range(200)}) > 20
    assert [age_years(a) for a in ("045Y", "095Y", "018M", "006W", "", "45")] == [45, 90, 1, 0, None, None]


def test_committed_data_dictionary_matches_the_code() -> None:
    page = (REPO / "docs" / "research-export.md").read_text("utf-8")
    assert dictionary_markdown() in page, "regenerate: python -m audit.research.export > docs/research-export.md"
