"""Fixtures of the inference tests: the tiny checkpoint (made once), its backend, a served copy."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from inference.tiny import write_tiny
from inference.transformers_backend import TransformersBackend
from tests.conftest import REPO, free_port


def png_bytes(width: int, height: int, seed: int = 0) -> bytes:
    """A real PNG of noise (key images are encoded PNG bytes)."""
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny(tmp_path_factory.mktemp("models") / "tiny-hf", layout="hf")


@pytest.fixture(scope="session")
def tiny_backend(tiny_hf: Path) -> Iterator[TransformersBackend]:
    backend = TransformersBackend(tiny_hf, device="cpu")
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def served_tiny(tiny_hf: Path) -> Iterator[str]:
    """``taqrir model serve`` on the tiny checkpoint, as a real subprocess on a free port."""
    port = free_port()
    code = "import sys; from inference.cli import model_app; sys.argv[0] = 'taqrir model'; model_app()"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "serve", "--model-path", str(tiny_hf), "--port", str(port),
         "--device", "cpu", "--served-model-name", "tiny-bimedix2", "--log-level", "warning"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            pytest.fail(f"taqrir model serve exited early:\n{out}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("taqrir model serve did not become healthy in 90 s")
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
