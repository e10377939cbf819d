from __future__ import annotations

from pathlib import Path

import pytest

from ground.errors import ConfigError
from taqrir.settings import load_settings


def test_defaults_env_file_and_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "taqrir.yaml"
    cfg.write_text("listener:\n  ae_title: FROMFILE\n  port: 4242\nstudy:\n  stable_after: 7\n", "utf-8")
    monkeypatch.setenv("TAQRIR_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("TAQRIR_LISTENER__PORT", "5151")
    s = load_settings(cfg)
    assert s.listener.ae_title == "FROMFILE"  # file
    assert s.listener.port == 5151  # environment beats the file
    assert s.study.stable_after == 7
    assert s.database_url == f"sqlite:///{(tmp_path / 'd' / 'taqrir.db').resolve()}"
    assert s.storage_url.startswith("file://")
    assert load_settings(cfg, study={"stable_after": 1.5}).study.stable_after == 1.5  # keywords beat all


def test_bad_config_is_explained(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n", "utf-8")
    with pytest.raises(ConfigError, match="mapping"):
        load_settings(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("listner: {}\n", "utf-8")
    with pytest.raises(Exception, match="listner"):
        load_settings(unknown)


def test_placeholder_research_key_is_refused_outside_development() -> None:
    import pytest
    from pydantic import ValidationError

    from taqrir.settings import load_settings

    assert load_settings().environment == "development"  # the placeholder is fine here
    with pytest.raises(ValidationError, match="pseudonym_key"):
        load_settings(environment="production")
    with pytest.raises(ValidationError, match="pseudonym_key"):
        load_settings(environment="production", research={"pseudonym_key": "short"})
    ok = load_settings(environment="production", research={"pseudonym_key": "x" * 32})
    assert ok.research.pseudonym_key.get_secret_value() == "x" * 32
    assert "x" * 32 not in repr(ok)  # a secret, never printed
