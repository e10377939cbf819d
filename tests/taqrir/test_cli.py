"""The ``taqrir`` command as an operator runs it: a real process, real settings from the
environment, a real index (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from alembic.script import ScriptDirectory
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import inspect
from sqlalchemy.engine import Engine

from ground import migrations
from ground.db import make_engine
from ground.migrations import alembic_config
from integrations.dicom.ingest import ingest_file
from integrations.dicom.listener import _configure_pydicom
from storage import FileStorage
from taqrir.settings import load_settings, with_places
from tests.conftest import DICOM_DIR, free_port
from tests.factories.db import reset_postgres_schema
from tests.factories.dcmtk import echoscu
from tests.factories.listener import receivers

REPO = Path(__file__).resolve().parents[2]


def _taqrir(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "taqrir", *args], check=False, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **env}, cwd=REPO)


def _index(engine: Engine, storage: FileStorage, path: Path) -> str:
    _configure_pydicom()
    staged = storage.staging_file(delete=False, suffix=".dcm")
    staged.write(path.read_bytes())
    staged.close()
    result = ingest_file(engine=engine, storage=storage, staged=Path(staged.name), calling_ae="PACS")
    return result.headers.study_instance_uid


def test_render_of_nothing_renderable_says_why_writes_provenance_and_fails(
    engine: Engine, db_url: str, tmp_path: Path
) -> None:
    """Item 9: a study whose only image is JPEG XL (no decoder): the reasons, printed and in
    provenance.json, exit status 1, no traceback."""
    storage = FileStorage(tmp_path / "storage")
    study = _index(engine, storage, DICOM_DIR / "malformed" / "dcm4che_will-jxl.dcm")
    out = tmp_path / "out"
    run = _taqrir("render", study, str(out), env={
        "TAQRIR_DATABASE_URL": db_url, "TAQRIR_STORAGE_URL": storage.root.as_uri(),
        "TAQRIR_DATA_DIR": str(tmp_path / "data")})
    assert run.returncode == 1, run.stdout + run.stderr
    assert "Traceback" not in run.stderr
    assert f"nothing renderable in study {study}" in run.stderr
    assert "unsupported transfer syntax 1.2.840.10008.1.2.4.111" in run.stderr
    prov = json.loads((out / "provenance.json").read_text("utf-8"))
    assert prov["key_images"] == []
    (failure,) = prov["failures"]
    assert "unsupported transfer syntax 1.2.840.10008.1.2.4.111" in failure["reason"]
    assert [d["chosen"] for d in prov["decisions"]] == [True]
    assert not list(out.glob("*.png"))


# -- one way to give a place and a port (item 30) --------------------------------------------

def _wait_http(url: str, timeout: float = 60) -> int:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return httpx.get(url, timeout=2).status_code
        except httpx.HTTPError:
            time.sleep(0.3)
    raise AssertionError(f"{url} never answered")


def _start(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "taqrir", *args], env={**os.environ, **env}, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _end(proc: subprocess.Popen[str]) -> str:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    out = proc.stdout.read() if proc.stdout else ""
    print(out)  # pytest shows it when the test fails
    return out


def _wait_answering(proc: subprocess.Popen[str], port: int) -> None:
    """Wait (60 s at most) until the listener ``proc`` answers C-ECHO on ``port``."""
    deadline = time.monotonic() + 60
    while echoscu(port).returncode != 0:
        assert time.monotonic() < deadline and proc.poll() is None, _end(proc)
        time.sleep(0.1)


def test_api_takes_host_and_port_and_the_data_dir(tmp_path: Path) -> None:
    data = tmp_path / "place"
    env = {"TAQRIR_LOG_LEVEL": "WARNING"}
    assert _taqrir("--data-dir", str(data), "db", "upgrade", env=env).returncode == 0
    assert (data / "taqrir.db").is_file()  # the place given is the place used
    port = free_port()
    proc = _start("--data-dir", str(data), "api", "--host", "127.0.0.1", "--port", str(port), env=env)
    try:
        assert _wait_http(f"http://127.0.0.1:{port}/fhir/metadata") == 200
    finally:
        out = _end(proc)
    assert "No such option" not in out


def test_listen_takes_the_same_option_names(tmp_path: Path) -> None:
    port = free_port()
    env = {"TAQRIR_DATA_DIR": str(tmp_path / "d"), "TAQRIR_LOG_LEVEL": "WARNING"}
    assert _taqrir("db", "upgrade", env=env).returncode == 0
    proc = _start("listen", "--dicom-host", "127.0.0.1", "--dicom-port", str(port), env=env)
    try:
        _wait_answering(proc, port)
    finally:
        _end(proc)
    assert (tmp_path / "d" / "taqrir.db").is_file()


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads the forked receivers from /proc")
@pytest.mark.parametrize("setting", [None, "1", "3"])
def test_listen_runs_one_receiving_process_per_core_unless_told(tmp_path: Path, setting: str | None) -> None:
    """Unset, ``listener.processes`` is the cores ``taqrir listen`` may run on (at most four):
    one process is bound by the GIL to one core. Set, it is what was set."""
    cores = len(os.sched_getaffinity(0))
    expected = min(cores, 4) if setting is None else int(setting)
    port = free_port()
    env = {"TAQRIR_DATA_DIR": str(tmp_path / "d"), "TAQRIR_LOG_LEVEL": "WARNING"}
    assert _taqrir("db", "upgrade", env=env).returncode == 0
    if setting is not None:
        env["TAQRIR_LISTENER__PROCESSES"] = setting
    run_env = {k: v for k, v in os.environ.items() if k != "TAQRIR_LISTENER__PROCESSES"}
    proc = subprocess.Popen([sys.executable, "-m", "taqrir", "listen", "--dicom-host", "127.0.0.1",
                             "--dicom-port", str(port)], env={**run_env, **env}, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        _wait_answering(proc, port)
        assert len(receivers(proc.pid)) == expected - 1
    finally:
        out = _end(proc)
    assert f"with {expected} receiving process(es)" in out


def test_demo_honours_taqrir_data_dir_and_never_wipes_foreign_data(tmp_path: Path) -> None:
    place = tmp_path / "clinic-data"
    place.mkdir()
    (place / "taqrir.db").write_bytes(b"real data")
    run = _taqrir("demo", env={"TAQRIR_DATA_DIR": str(place)}, timeout=60)
    assert run.returncode == 2, run.stdout + run.stderr
    assert f"{place} holds data that no demo made" in run.stderr
    assert (place / "taqrir.db").read_bytes() == b"real data"


def test_places_and_ports_come_from_settings_unless_given() -> None:
    settings = load_settings(api={"port": 9000, "base_url": "http://127.0.0.1:9000/fhir"},
                             listener={"port": 4242})
    same = with_places(settings)
    assert (same.listener.port, same.api.port, same.api.base_url) == (4242, 9000, "http://127.0.0.1:9000/fhir")
    moved = with_places(load_settings(), dicom_port=1104, api_host="0.0.0.0", api_port=8443)
    assert (moved.listener.port, moved.api.host, moved.api.port) == (1104, "0.0.0.0", 8443)
    assert moved.api.base_url == "http://127.0.0.1:8443/fhir"
    public = with_places(load_settings(api={"base_url": "https://pacs.example.org/fhir"}), api_port=8443)
    assert public.api.base_url == "https://pacs.example.org/fhir"  # configured explicitly: kept


# -- migrations on demand only (issue 12) ------------------------------------------------------

@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database that was never migrated (no tables, no alembic_version)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'taqrir.db'}"
    url: str = request.getfixturevalue("pg_server_url")
    reset_postgres_schema(url)
    return url


@pytest.mark.parametrize("command", [["studies"], ["listen", "--dicom-port", "0"], ["metrics"], ["outbox"],
                                     ["audit-verify"], ["deltas"], ["redraft", "1.2.3"]])
def test_commands_refuse_a_database_that_was_never_migrated(empty_db_url: str, tmp_path: Path,
                                                            command: list[str]) -> None:
    run = _taqrir(*command, env={"TAQRIR_DATABASE_URL": empty_db_url, "TAQRIR_DATA_DIR": str(tmp_path / "data")},
                  timeout=60)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "Traceback" not in run.stderr
    assert "has never been migrated: run `taqrir db upgrade` first" in run.stderr
    engine = make_engine(empty_db_url)
    try:
        assert inspect(engine).get_table_names() == []  # refused before touching the schema
    finally:
        engine.dispose()


def test_an_old_schema_is_refused_until_db_upgrade(empty_db_url: str, tmp_path: Path) -> None:
    env = {"TAQRIR_DATABASE_URL": empty_db_url, "TAQRIR_DATA_DIR": str(tmp_path / "data")}
    engine = make_engine(empty_db_url)
    first = ScriptDirectory.from_config(alembic_config()).get_base()
    assert isinstance(first, str)
    migrations.upgrade(engine, first)  # a database left at the first revision by an older Taqrir
    engine.dispose()
    run = _taqrir("studies", env=env, timeout=60)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stdout + run.stderr
    assert f"is at schema {first}" in run.stderr and "run `taqrir db upgrade`" in run.stderr
    upgraded = _taqrir("db", "upgrade", env=env, timeout=120)
    assert upgraded.returncode == 0, upgraded.stdout + upgraded.stderr
    run = _taqrir("studies", env=env, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "no studies received yet" in run.stdout


def test_the_worker_refuses_an_old_schema_before_taking_tasks(empty_db_url: str, tmp_path: Path) -> None:
    run = _taqrir("worker", env={"TAQRIR_DATABASE_URL": empty_db_url, "TAQRIR_DATA_DIR": str(tmp_path / "data"),
                                 "TAQRIR_QUEUE__BROKER_URL": "redis://127.0.0.1:6379/14"}, timeout=60)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stdout + run.stderr
    assert "run `taqrir db upgrade`" in run.stderr


# Each pre-forked receiver takes two seconds to prepare its intake journal segment.
_SLOW_RECEIVERS = """
import os, sys, time
from integrations.dicom.intake import IntakeJournal
first = os.getpid()
real = IntakeJournal.open
def slow(self):
    if os.getpid() != first:
        time.sleep(2)
    real(self)
IntakeJournal.open = slow
from taqrir.cli import main
sys.argv = ["taqrir", "listen", "--dicom-host", "127.0.0.1", "--dicom-port", sys.argv[1]]
main()
"""


def test_listen_serves_once_every_receiving_process_is_ready(tmp_path: Path) -> None:
    """A receiving process prepares its journal segment (16 MiB written and flushed) before it
    serves; the parent does not answer before its receivers are ready, so that a sender arriving
    at once does not share the disk with that preparation."""
    port = free_port()
    env = {"TAQRIR_DATA_DIR": str(tmp_path / "d"), "TAQRIR_LOG_LEVEL": "WARNING", "TAQRIR_LISTENER__PROCESSES": "2"}
    assert _taqrir("db", "upgrade", env=env).returncode == 0
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_RECEIVERS, str(port)], env={**os.environ, **env}, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not receivers(proc.pid):
            assert time.monotonic() < deadline and proc.poll() is None, _end(proc)
            time.sleep(0.05)
        forked = time.monotonic()
        _wait_answering(proc, port)
        assert time.monotonic() - forked > 1.5  # not before the receiver was ready
    finally:
        _end(proc)


def _threads(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/task").iterdir()))


def _listen_with_two_processes(tmp_path: Path, **env: str) -> tuple[subprocess.Popen[str], int]:
    """``taqrir listen`` with two receiving processes on a fresh SQLite index (``env`` adds to or
    overrides its environment), answering C-ECHO; returns it and its port."""
    port = free_port()
    env = {"TAQRIR_DATA_DIR": str(tmp_path / "d"), "TAQRIR_LOG_LEVEL": "WARNING", "TAQRIR_LISTENER__PROCESSES": "2",
           **env}
    assert _taqrir("db", "upgrade", env=env).returncode == 0
    proc = _start("listen", "--dicom-host", "127.0.0.1", "--dicom-port", str(port), env=env)
    _wait_answering(proc, port)
    return proc, port


def _associate(port: int) -> Any:
    ae = AE(ae_title="SPREAD")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="TAQRIR")
    return assoc


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts each receiving process's threads in /proc")
def test_listen_spreads_parallel_associations_evenly_over_its_processes(tmp_path: Path) -> None:
    """Left to the race for accept(), parallel associations often landed all in one process
    (bound by the GIL to one core). Each association is one thread of the process that took it."""
    proc, port = _listen_with_two_processes(tmp_path)
    try:
        processes = [proc.pid, *receivers(proc.pid)]
        time.sleep(0.5)  # the C-ECHO's association thread has ended
        idle = [_threads(pid) for pid in processes]
        for _ in range(5):
            _assert_four_associations_split_evenly(port, processes, idle)
    finally:
        _end(proc)


def _assert_four_associations_split_evenly(port: int, processes: list[int], idle: list[int]) -> None:
    """Four associations held at once are two threads more in each of ``processes`` (which had
    ``idle`` threads); once released, their threads end."""
    held = [_associate(port) for _ in range(4)]
    try:
        assert all(assoc.is_established for assoc in held)
        assert [_threads(pid) - before for pid, before in zip(processes, idle, strict=True)] == [2, 2]
    finally:
        for assoc in held:
            assoc.release()
    deadline = time.monotonic() + 10
    while [_threads(pid) for pid in processes] != idle:
        assert time.monotonic() < deadline, "association threads did not end after release"
        time.sleep(0.05)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts each receiving process's threads in /proc")
def test_listen_replaces_a_receiving_process_that_dies(tmp_path: Path) -> None:
    """A receiving process killed (the OOM killer, say) is replaced: before, the listener went on
    with one process fewer, so parallel associations shared one core until a restart."""
    proc, port = _listen_with_two_processes(tmp_path, TAQRIR_LOG_LEVEL="INFO")
    try:
        (first,) = receivers(proc.pid)
        held = [_associate(port) for _ in range(4)]  # two of them die with it
        os.kill(first, signal.SIGKILL)
        for assoc in held:
            assoc.release()
        deadline = time.monotonic() + 15
        while receivers(proc.pid) in ([], [first]):
            assert time.monotonic() < deadline, "the killed receiving process was not replaced"
            time.sleep(0.05)
        _wait_answering(proc, port)
        time.sleep(0.5)  # the replacement serves; the C-ECHO's association thread has ended
        processes = [proc.pid, *receivers(proc.pid)]
        # the dead one's connections no longer count: the new one takes its half
        _assert_four_associations_split_evenly(port, processes, [_threads(pid) for pid in processes])
    finally:
        out = _end(proc)
    assert f"receiving process {first} exited (killed by SIGKILL); replacing it in 1 s" in out


def test_listen_max_associations_is_the_whole_listener_s(tmp_path: Path) -> None:
    """``listener.max_associations`` is what a PACS admin set for the listener, not for each of
    its receiving processes."""
    proc, port = _listen_with_two_processes(tmp_path, TAQRIR_LISTENER__MAX_ASSOCIATIONS="2")
    try:
        held = [_associate(port) for _ in range(2)]
        try:
            assert all(assoc.is_established for assoc in held)
            third = _associate(port)
            assert third.is_rejected
            held[0].release()
            time.sleep(0.3)
            fourth = _associate(port)
            assert fourth.is_established  # a freed slot is free in either process
            fourth.release()
        finally:
            for assoc in held[1:]:
                assoc.release()
    finally:
        _end(proc)
