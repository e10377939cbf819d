"""Fixtures of the audit tests."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest


@pytest.fixture
def keep_logging() -> Iterator[None]:
    """`taqrir` commands run in-process (CliRunner) configure the root logger for themselves;
    put it back so that later tests' output is not mixed with log lines."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
