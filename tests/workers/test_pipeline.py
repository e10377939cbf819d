"""The drafting pipeline end to end: real Redis, real worker processes, the tiny model."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import select

from audit.chain import AuditRecord, verify
from ground.db import session_scope
from inference.tiny import write_tiny
from integrations.dicom.index import Study
from integrations.dicom.listener import Listener
from reporting.consistency import ConsistencyResult
from reporting.draft_record import DraftRecord
from storage import open_storage
from taqrir.settings import Settings, load_settings
from tests.conftest import REPO, free_port
from tests.factories.dcmtk import send_raw, storescu
from workers.pipeline import Dispatcher, Sweeper
from workers.service import PipelineContext

CORPUS = REPO / "tests" / "data" / "dicom"
CT3 = sorted((CORPUS / "ct" / "series_dcmqi_ct3slice").iterdir())
MR16 = sorted((CORPUS / "mr" / "series_dcm4che_wrist").iterdir())
JXL = CORPUS / "malformed" / "dcm4che_will-jxl.dcm"
CT_UID = "1.2.392.200103.20080913.113635.0.2009.6.22.21.43.10.22941.1"
MR_UID = "1.113654.3.13.1026"

pytestmark = pytest.mark.slow

#: Failure-path tests run on PostgreSQL (production); the happy path runs on both databases.
POSTGRES_ONLY = pytest.mark.parametrize("db_url", ["postgres"], indirect=True)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny(tmp_path_factory.mktemp("pipeline-models") / "tiny-hf", layout="hf")


class RedisServer:
    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        assert exe, "redis-server is needed (Debian package redis-server; .ci/run installs it)"
        self.proc = subprocess.Popen([exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.workdir)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True, text=True).stdout.strip() == "PONG":
                return
            time.sleep(0.1)
        raise AssertionError("redis did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


class Pipeline:
    """A listener + dispatcher + requeue sweeper in this process; workers as real subprocesses."""

    def __init__(self, env: dict[str, str], settings: Settings, engine: Engine, tmp_path: Path) -> None:
        self.env = env
        self.settings = settings
        self.engine = engine
        self.tmp_path = tmp_path
        self.workers: list[subprocess.Popen[bytes]] = []
        self.dispatcher = Dispatcher(settings, PipelineContext.from_settings(settings, engine))
        self.listener = Listener(settings=settings.listener, study_settings=settings.study, engine=engine,
                                 storage=open_storage(settings.storage_url),
                                 handoff=self.dispatcher.study_stable)
        self.port = self.listener.start()
        self.sweeper = Sweeper(self.dispatcher, 1.0)
        self.sweeper.start()

    def start_worker(self, **env: str) -> subprocess.Popen[bytes]:
        log = self.tmp_path / f"worker{len(self.workers)}.log"
        proc = subprocess.Popen([sys.executable, "-m", "taqrir", "worker", "--queues", "render,infer,publish"],
                                env={**self.env, **env}, stdout=open(log, "wb"),  # noqa: SIM115 - the child owns it
                                stderr=subprocess.STDOUT)
        self.workers.append(proc)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if " ready." in log.read_text(errors="replace"):
                return proc
            if proc.poll() is not None:
                raise AssertionError(f"worker exited: {log.read_text()[-2000:]}")
            time.sleep(0.2)
        raise AssertionError(f"worker not ready: {log.read_text()[-2000:]}")

    def states(self) -> dict[str, tuple[str, int, str | None]]:
        with session_scope(self.engine) as s:
            return {st.study_instance_uid: (st.state, st.version, st.failure_reason) for st in s.exec(select(Study)).all()}

    def wait_state(self, uid: str, states: set[str], timeout: float = 120) -> tuple[str, int, str | None]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.states().get(uid)
            if got and got[0] in states:
                return got
            time.sleep(0.2)
        raise AssertionError(f"{uid} never reached {states}; now {self.states().get(uid)}")

    def drafts_created(self, uid: str) -> int:
        """draft.created audit records for this study (the unique index alone would hide a
        second successful inference; the audit trail does not)."""
        with session_scope(self.engine) as s:
            rows = s.exec(select(AuditRecord).where(AuditRecord.action == "draft.created")).all()
        return sum(1 for r in rows if json.loads(r.details).get("study") == uid)

    def drafts(self, uid: str) -> list[DraftRecord]:
        with session_scope(self.engine) as s:
            return list(s.exec(select(DraftRecord).where(DraftRecord.study_instance_uid == uid)).all())

    def close(self) -> None:
        self.sweeper.stop()
        self.listener.stop()
        self.dispatcher.close()
        for w in self.workers:
            if w.poll() is None:
                w.terminate()
        for w in self.workers:
            try:
                w.wait(timeout=15)
            except subprocess.TimeoutExpired:
                w.kill()


@pytest.fixture
def make_pipeline(db_url: str, engine: Engine, tmp_path: Path, redis_server: RedisServer,
                  tiny_model: Path) -> Iterator[Callable[..., Pipeline]]:
    made: list[Pipeline] = []

    def _make(**extra: str) -> Pipeline:
        env = {**os.environ,
               "TAQRIR_DATA_DIR": str(tmp_path / "data"),
               "TAQRIR_DATABASE_URL": db_url,
               "TAQRIR_QUEUE__BROKER_URL": redis_server.url,
               "TAQRIR_QUEUE__REQUEUE_AFTER": "4",
               "TAQRIR_QUEUE__RETRY_BACKOFF": "0.2",
               "TAQRIR_QUEUE__MAX_RETRIES": "2",
               "TAQRIR_INFERENCE__MODEL_PATH": str(tiny_model),
               "TAQRIR_INFERENCE__TORCH_THREADS": "1",
               "TAQRIR_STUDY__STABLE_AFTER": "1",
               "TAQRIR_STUDY__SWEEP_INTERVAL": "0.3",
               "TAQRIR_LISTENER__MIN_FREE_BYTES": "0",
               "TAQRIR_LISTENER__HOST": "127.0.0.1",
               "TAQRIR_LISTENER__PORT": "0",
               **extra}
        saved = {k: os.environ.get(k) for k in env if k.startswith("TAQRIR_")}
        os.environ.update({k: v for k, v in env.items() if k.startswith("TAQRIR_")})
        try:
            settings = load_settings()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        p = Pipeline(env, settings, engine, tmp_path)
        made.append(p)
        return p

    yield _make
    for p in made:
        p.close()


def test_studies_end_as_drafts_and_an_undecodable_one_fails_alone(make_pipeline: Callable[..., Pipeline]) -> None:
    p = make_pipeline()
    p.start_worker()
    assert storescu(p.port, CT3).statuses() == ["Success"] * 3
    assert storescu(p.port, MR16).statuses() == ["Success"] * 16
    assert send_raw(p.port, JXL) == 0
    jxl_uid = next(uid for uid in p.states() if uid not in (CT_UID, MR_UID))
    for uid in (CT_UID, MR_UID):
        assert p.wait_state(uid, {"drafted"})[0] == "drafted"
    _state, _, reason = p.wait_state(jxl_uid, {"failed"})
    assert reason and "1.2.840.10008.1.2.4.111" in reason  # JPEG XL: no decoder
    for uid in (CT_UID, MR_UID):
        (_d,) = p.drafts(uid)
        deadline = time.monotonic() + 30
        while p.drafts(uid)[0].published_at is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert p.drafts(uid)[0].fhir_report_id
        # every draft carries its bilingual consistency check and its guard result
        rec = p.drafts(uid)[0]
        assert rec.consistency is not None and rec.guard is not None
        assert ConsistencyResult.model_validate_json(rec.consistency).consistent is rec.consistent
        assert json.loads(rec.guard)["passed"] is True and json.loads(rec.guard)["model_calls"] >= 2
    listed = subprocess.run([sys.executable, "-m", "taqrir", "studies", "--json"], env=p.env,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    by_uid = {row["study_instance_uid"]: row for row in map(json.loads, listed)}
    for uid in (CT_UID, MR_UID):
        assert by_uid[uid]["consistency"]["consistent"] is p.drafts(uid)[0].consistent
    assert by_uid[jxl_uid]["consistency"] is None
    table = subprocess.run([sys.executable, "-m", "taqrir", "studies"], env=p.env,
                           capture_output=True, text=True, check=True).stdout
    assert "EN/AR" in table
    with session_scope(p.engine) as s:
        assert verify(s).ok


@POSTGRES_ONLY
def test_worker_killed_during_inference_drafts_exactly_once(make_pipeline: Callable[..., Pipeline]) -> None:
    # long generations so the kill lands inside inference
    p = make_pipeline(TAQRIR_INFERENCE__TINY_MAX_NEW_TOKENS="400")
    first = p.start_worker()
    assert storescu(p.port, MR16).statuses() == ["Success"] * 16
    p.wait_state(MR_UID, {"inferring"})
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert p.states()[MR_UID][0] == "inferring"
    p.start_worker()
    assert p.wait_state(MR_UID, {"drafted"}, timeout=180)[0] == "drafted"
    time.sleep(2)
    assert len(p.drafts(MR_UID)) == 1
    assert p.drafts_created(MR_UID) == 1


@POSTGRES_ONLY
def test_redis_restart_loses_nothing(make_pipeline: Callable[..., Pipeline], redis_server: RedisServer) -> None:
    # 1. the broker is gone when a study becomes stable: its first message is never sent
    p = make_pipeline(TAQRIR_INFERENCE__TINY_MAX_NEW_TOKENS="300")
    p.start_worker()
    redis_server.stop()
    assert storescu(p.port, CT3).statuses() == ["Success"] * 3
    p.wait_state(CT_UID, {"queued"}, timeout=60)
    time.sleep(1)
    redis_server.start()  # empty: Redis kept nothing
    # 2. the broker restarts while the worker is inferring: the unacknowledged message and the
    #    publish message that would follow are lost with it
    p.wait_state(CT_UID, {"inferring"}, timeout=120)
    redis_server.stop()
    time.sleep(1)
    redis_server.start()
    assert p.wait_state(CT_UID, {"drafted"}, timeout=180)[0] == "drafted"
    deadline = time.monotonic() + 60
    while not p.drafts(CT_UID)[0].published_at and time.monotonic() < deadline:
        time.sleep(0.5)
    assert p.drafts(CT_UID)[0].published_at is not None
    assert p.drafts_created(CT_UID) == 1


@POSTGRES_ONLY
def test_duplicated_messages_make_one_draft(make_pipeline: Callable[..., Pipeline]) -> None:
    from workers.tasks import infer_task, render_task

    p = make_pipeline(TAQRIR_INFERENCE__TINY_MAX_NEW_TOKENS="200")
    p.start_worker(TAQRIR_QUEUE__REQUEUE_AFTER="600")
    p.start_worker(TAQRIR_QUEUE__REQUEUE_AFTER="600")  # a second worker takes the duplicates at once
    assert storescu(p.port, CT3).statuses() == ["Success"] * 3
    _, version, _ = p.wait_state(CT_UID, {"inferring"})
    for _ in range(2):  # duplicates while the first delivery is still inferring
        render_task.delay(CT_UID, version)
        infer_task.delay(CT_UID, version)
    p.wait_state(CT_UID, {"drafted"}, timeout=180)
    time.sleep(8)  # let every duplicate run to its end
    assert p.states()[CT_UID][0] == "drafted"
    assert len(p.drafts(CT_UID)) == 1
    assert p.drafts_created(CT_UID) == 1


@POSTGRES_ONLY
def test_unreachable_model_server_fails_then_redraft_succeeds(make_pipeline: Callable[..., Pipeline],
                                                                tiny_model: Path) -> None:
    model_port = free_port()
    p = make_pipeline(TAQRIR_INFERENCE__BACKEND="sglang",
                      TAQRIR_INFERENCE__SERVER_URL=f"http://127.0.0.1:{model_port}",
                      TAQRIR_INFERENCE__MAX_RETRIES="1", TAQRIR_INFERENCE__RETRY_BACKOFF="0.1",
                      TAQRIR_INFERENCE__CONNECT_TIMEOUT="1")
    p.start_worker()
    assert storescu(p.port, CT3).statuses() == ["Success"] * 3
    _state, _, reason = p.wait_state(CT_UID, {"failed"}, timeout=120)
    assert reason and "gave up after 3 attempts" in reason, reason
    server = subprocess.Popen([sys.executable, "-m", "taqrir", "model", "serve", "--model-path", str(tiny_model),
                               "--port", str(model_port), "--served-model-name", "BiMediX2-8B-Bi"],
                              env=p.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import httpx

        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{model_port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        out = subprocess.run([sys.executable, "-m", "taqrir", "redraft", CT_UID], env=p.env,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert p.wait_state(CT_UID, {"drafted"}, timeout=120)[0] == "drafted"
        assert len(p.drafts(CT_UID)) == 1
    finally:
        server.terminate()
        server.wait(timeout=20)


