"""Issue 11, items 28-29: `taqrir token` refuses scopes that are not SMART v2; `taqrir api` refuses
to start on a database that was never migrated (run as the real command, in a subprocess)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import typer
from typer.testing import CliRunner

from integrations.fhir.auth import InvalidScope, TokenVerifier, check_scope
from taqrir.cli_api import register
from taqrir.settings import load_settings
from tests.conftest import REPO, free_port
from tests.factories.db import reset_postgres_schema


def _token(tmp_path: Path, *scopes: str) -> tuple[int, str]:
    settings = load_settings(data_dir=tmp_path / "data")
    app = typer.Typer()
    register(app, lambda: settings)
    args = ["token", "dr.x"] + [x for s in scopes for x in ("--scope", s)]
    result = CliRunner().invoke(app, args)
    return result.exit_code, result.output


@pytest.mark.parametrize("scope", ["user/DiagnosticReport.rsu", "user/DiagnosticReport.", "user/DiagnosticReport.x",
                                   "user/DiagnosticReport.rr", "user/DiagnosticReport.rs?status=final",
                                   "DiagnosticReport.rs", "admin/DiagnosticReport.rs", "user/Diagnostic-Report.rs"])
def test_28_token_refuses_scopes_that_are_not_smart_v2(tmp_path: Path, scope: str) -> None:
    code, output = _token(tmp_path, scope)
    assert code == 2 and "SMART" in output and "Traceback" not in output, output
    if scope.endswith(".rsu"):
        assert "did you mean .rus" in output


@pytest.mark.parametrize("scope", ["user/DiagnosticReport.rus", "patient/*.cruds", "system/Patient.r",
                                   "user/*.read", "user/DiagnosticReport.write", "user/*.*", "openid", "fhirUser",
                                   "launch/patient", "offline_access"])
def test_28_token_accepts_valid_smart_scopes(tmp_path: Path, scope: str) -> None:
    code, output = _token(tmp_path, scope)
    assert code == 0, output
    settings = load_settings(data_dir=tmp_path / "data")
    principal = TokenVerifier(settings.api, settings.data_dir).verify("Bearer " + output.strip())
    if "/" in scope and not scope.startswith("launch"):
        assert principal.grants, scope


def test_28_readme_token_examples_are_valid() -> None:
    checked = 0
    for readme in (REPO / "README.md", REPO / "integrations" / "fhir" / "README.md"):
        for line in readme.read_text().splitlines():
            if "taqrir token" in line:
                for scope in re.findall(r"(?:--scope|-s)[ =]`?([A-Za-z*][^\s`'\")]*)", line):
                    check_scope(scope)
                    checked += 1
    assert checked >= 1
    with pytest.raises(InvalidScope):
        check_scope("user/DiagnosticReport.rsu")


def _api(db_url: str, tmp_path: Path) -> tuple[subprocess.Popen[str], int]:
    port = free_port()
    env = {**os.environ, "TAQRIR_DATA_DIR": str(tmp_path / "data"), "TAQRIR_DATABASE_URL": db_url,
           "TAQRIR_API__PORT": str(port)}
    env.pop("TAQRIR_CONFIG", None)
    proc = subprocess.Popen([str(Path(sys.executable).parent / "taqrir"), "api"], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, port


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_29_api_refuses_a_database_never_migrated(tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> None:
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'never.db'}"
    else:
        url = request.getfixturevalue("pg_server_url")
        reset_postgres_schema(url)
    proc, _ = _api(url, tmp_path)
    try:
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode not in (0, None), out
    assert "taqrir db upgrade" in out and "Traceback" not in out, out


def test_29_api_starts_on_a_migrated_database(db_url: str, tmp_path: Path) -> None:
    proc, port = _api(db_url, tmp_path)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                if httpx.get(f"http://127.0.0.1:{port}/fhir/metadata", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "taqrir api did not start"
            time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
