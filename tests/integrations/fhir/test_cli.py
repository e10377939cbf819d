"""`taqrir token` through register(): a token the API accepts, with the key made in data_dir."""

from __future__ import annotations

import stat
from pathlib import Path

import typer
from typer.testing import CliRunner

from integrations.fhir.auth import TokenVerifier
from taqrir.cli_api import register
from taqrir.settings import load_settings


def test_token_command_issues_a_token_the_verifier_accepts(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path / "data")
    app = typer.Typer()
    register(app, lambda: settings)
    result = CliRunner().invoke(app, ["token", "dr.salma", "--scope", "user/DiagnosticReport.rs user/DiagnosticReport.u",
                                      "--name", "Dr Salma"])
    assert result.exit_code == 0, result.output
    key = tmp_path / "data" / "api-key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    principal = TokenVerifier(settings.api, settings.data_dir).verify("Bearer " + result.output.strip())
    assert principal.subject == "dr.salma" and principal.name == "Dr Salma"
    assert principal.allows("DiagnosticReport", "u") and not principal.allows("Patient", "r")
    assert {c.name for c in app.registered_commands} == {"api", "token"}
