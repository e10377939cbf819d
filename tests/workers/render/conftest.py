"""Fixtures of the rendering tests: corpus paths and small writers of modified real files."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import DICOM_DIR
from workers.render_config import RenderSettings

CORPUS = DICOM_DIR


def png_array(png: bytes) -> np.ndarray:
    """Decode PNG bytes with Pillow (an independent decoder) into an array."""
    with Image.open(io.BytesIO(png)) as img:
        img.load()
        return np.asarray(img)


@pytest.fixture
def settings() -> RenderSettings:
    return RenderSettings()


@pytest.fixture
def corpus() -> Path:
    return CORPUS


@pytest.fixture
def corpus_file() -> Callable[[str], Path]:
    def get(rel: str) -> Path:
        path = CORPUS / rel
        assert path.is_file(), f"corpus file {rel} is missing"
        return path

    return get
