from __future__ import annotations

from pathlib import Path

from taqrir.settings import load_settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_example_config_loads() -> None:
    s = load_settings(DEPLOY / "taqrir.example.yaml")
    assert s.inference.backend == "sglang"
    assert s.queue.broker_url.startswith("redis://")
    assert s.listener.allowed_calling_aes == ["PACS1", "PACS2"]
    assert s.log_format == "json"
    assert [d.name for d in s.export.destinations] == ["main-pacs", "research-archive"]
    assert s.export.destinations[1].takes("pdf") and not s.export.destinations[1].takes("kos")


def test_systemd_units_call_real_commands() -> None:
    from typer.main import get_command

    from taqrir.cli import app

    commands = set(get_command(app).commands)  # type: ignore[attr-defined]
    for unit in (DEPLOY / "systemd").glob("*.service"):
        for line in unit.read_text().splitlines():
            if line.startswith(("ExecStart=", "ExecStartPre=")):
                args = line.split("=", 1)[1].split()
                assert args[1] in commands, f"{unit.name}: unknown command {args[1]}"
