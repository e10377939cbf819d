"""The demo's sample studies ship inside the package (issue 12): every file the demo sends is
there, byte-identical to its provenance entry, and the test corpus links to the same files."""

from __future__ import annotations

import hashlib
import json
import tomllib
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path

import pytest
from pynetdicom import _config
from sqlalchemy.engine import Engine

from integrations.dicom.config import ListenerSettings, StudySettings
from integrations.dicom.listener import Listener
from storage import FileStorage
from taqrir.demo import DEMO_STUDIES, SAMPLES, _files, send_files
from tests.conftest import DICOM_DIR, REPO

MANIFEST = SAMPLES.parent / "manifest.json"


def _sample_files() -> set[Path]:
    return {p for p in SAMPLES.rglob("*") if p.is_file()}


def test_every_demo_file_is_in_the_package_with_its_provenance() -> None:
    sent = {f for study in DEMO_STUDIES for f in _files(study)}
    assert sent == _sample_files() and len(sent) == 35  # only what the demo sends
    entries = {e["path"]: e for e in json.loads(MANIFEST.read_text("utf-8"))}
    assert set(entries) == {"dicom/" + f.relative_to(SAMPLES).as_posix() for f in sent}
    for f in sent:
        entry = entries["dicom/" + f.relative_to(SAMPLES).as_posix()]
        assert hashlib.sha256(f.read_bytes()).hexdigest() == entry["sha256"], f
        assert entry["source_repo"] and entry["licence"]
    assert (SAMPLES.parent / "PROVENANCE.md").is_file()


def test_the_package_data_patterns_take_every_sample() -> None:
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text("utf-8"))["tool"]["setuptools"]["package-data"]["taqrir"]
    package = SAMPLES.parent.parent
    for f in _sample_files() | {MANIFEST, SAMPLES.parent / "PROVENANCE.md"}:
        rel = f.relative_to(package).as_posix()
        assert any(fnmatch(rel, p.replace("**/", "*")) for p in patterns), rel


def test_the_corpus_links_to_the_samples_instead_of_copying_them() -> None:
    for f in _sample_files():
        in_corpus = DICOM_DIR / f.relative_to(SAMPLES)
        assert in_corpus.is_symlink() and in_corpus.resolve() == f.resolve(), in_corpus


@pytest.fixture
def listener(engine: Engine, tmp_path: Path) -> Iterator[Listener]:
    lst = Listener(settings=ListenerSettings(host="127.0.0.1", port=0, min_free_bytes=0),
                   study_settings=StudySettings(stable_after=3600, sweep_interval=3600), engine=engine,
                   storage=FileStorage(tmp_path / "storage"))
    lst.port = lst.start()  # type: ignore[attr-defined]
    yield lst
    lst.stop()


def test_sending_leaves_pynetdicoms_global_settings_as_they_were(listener: Listener) -> None:
    before = _config.STORE_SEND_CHUNKED_DATASET
    files = _files(DEMO_STUDIES[0])
    assert send_files(listener.port, files) == [0] * len(files)  # type: ignore[attr-defined]
    assert _config.STORE_SEND_CHUNKED_DATASET is before
    # sent as stored: the listener keeps each file's dataset byte for byte
    stored = {p.name: p.read_bytes() for p in listener.storage.root.rglob("*.dcm") if ".incoming" not in p.parts}
    assert len(stored) == len(files)
    for f in files:
        tail = f.read_bytes()[-4096:]
        assert any(data.endswith(tail) for data in stored.values()), f
