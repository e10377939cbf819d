"""The outbox delivering to a real PACS (Debian's Orthanc): into the same study, through a PACS that
is down and comes back, past one that refuses us, after a worker killed mid-send, and while a
destination is down for days. Runs on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import select, update

from audit.chain import AuditRecord, verify
from ground.clock import utcnow
from ground.db import session_scope
from integrations.dicom.destinations import Destination, ExportSettings
from integrations.dicom.export import deliver
from integrations.dicom.outbox import OutboxItem, OutboxObject, due_rows, enqueue_objects, take_due
from tests.conftest import DICOM_DIR, REPO, free_port
from tests.factories.export_objects import pdf_object, sr_object
from tests.factories.orthanc import OrthancServer

SOURCE = DICOM_DIR / "ct" / "pydicom_CT_small.dcm"


@pytest.fixture
def orthanc_factory(tmp_path: Path) -> Iterator[Callable[..., OrthancServer]]:
    made: list[OrthancServer] = []

    def make(name: str = "pacs", *, start: bool = True, **kwargs: Any) -> OrthancServer:
        server = OrthancServer(tmp_path / f"orthanc-{name}", **kwargs)
        made.append(server)
        if start:
            server.start()
        return server

    yield make
    for s in made:
        s.stop(kill=True)


def _dest(server: OrthancServer, name: str = "pacs", **kw: Any) -> Destination:
    return Destination(name=name, ae_title=server.aet, host="127.0.0.1", port=server.dicom_port, **kw)


def _objects(tmp_path: Path) -> list[OutboxObject]:
    return [sr_object(SOURCE, tmp_path / "out" / "sr.dcm"), pdf_object(SOURCE, tmp_path / "out" / "report.dcm")]


def _rows(engine: Engine) -> dict[int, OutboxItem]:
    with session_scope(engine) as s:
        return {r.id or 0: r for r in s.exec(select(OutboxItem)).all()}


def _queue(engine: Engine, objects: list[OutboxObject], dests: list[Destination]) -> list[int]:
    with session_scope(engine) as s:
        return enqueue_objects(s, draft_id="draft-1", study_instance_uid=str(_study_uid()), objects=objects,
                               destinations=dests)


def _study_uid() -> str:
    from pydicom import dcmread

    return str(dcmread(SOURCE, stop_before_pixels=True).StudyInstanceUID)


def test_delivered_objects_land_in_the_source_study(engine: Engine, tmp_path: Path,
                                                    orthanc_factory: Callable[..., OrthancServer]) -> None:
    pacs = orthanc_factory()
    study_id = pacs.upload(SOURCE.read_bytes())["ParentStudy"]
    objects = _objects(tmp_path)
    settings = ExportSettings(destinations=[_dest(pacs)])
    ids = _queue(engine, objects, settings.destinations)
    done = deliver(engine, settings, ids)
    assert [d.state.value for d in done] == ["sent", "sent"]
    for obj in objects:
        [inst] = pacs.find_instance(obj.sop_instance_uid)
        assert pacs.get(f"/instances/{inst}/study")["ID"] == study_id
    assert len(pacs.get(f"/studies/{study_id}/series")) == 3  # the CT and our two series
    rows = _rows(engine)
    assert all(r.state == "sent" and r.attempts == 1 and r.last_status == 0 for r in rows.values())
    with session_scope(engine) as s:
        actions = [a.action for a in s.exec(select(AuditRecord).order_by(AuditRecord.seq)).all()]
        assert actions.count("export.attempt") == 2 and actions.count("export.sent") == 2
        assert verify(s).ok
    # sending again (a duplicated message) does nothing: the rows are sent
    assert deliver(engine, settings, ids) == []


def test_pacs_down_then_back_is_retried_and_delivered(engine: Engine, tmp_path: Path,
                                                      orthanc_factory: Callable[..., OrthancServer]) -> None:
    pacs = orthanc_factory(start=False)
    settings = ExportSettings(destinations=[_dest(pacs)], backoff_initial=0.5, connect_timeout=2)
    ids = _queue(engine, _objects(tmp_path), settings.destinations)
    done = deliver(engine, settings, ids)
    assert {d.state.value for d in done} == {"failed"}
    row = _rows(engine)[ids[0]]
    assert "cannot connect" in (row.last_error or "") or "cannot reach" in (row.last_error or "")
    with session_scope(engine) as s:
        assert take_due(s, lease_s=60, redispatch_after_s=60) == []  # waits its backoff: no busy loop
    pacs.start()
    time.sleep(0.6)
    with session_scope(engine) as s:
        due = take_due(s, lease_s=60, redispatch_after_s=60)
    assert sorted(due) == sorted(ids)
    assert {d.state.value for d in deliver(engine, settings, due)} == {"sent"}
    rows = _rows(engine)
    assert all(r.attempts == 2 and r.state == "sent" for r in rows.values())
    assert all(len(pacs.find_instance(r.sop_instance_uid)) == 1 for r in rows.values())


def test_refusing_pacs_is_dead_at_once_and_another_destination_still_receives(
        engine: Engine, tmp_path: Path, orthanc_factory: Callable[..., OrthancServer]) -> None:
    strict = orthanc_factory("strict", aet="STRICT", known_aes={"someone": ("SOMEONE", 104)}, refuse_unknown=True)
    good = orthanc_factory("good", aet="GOOD")
    settings = ExportSettings(destinations=[_dest(strict, "strict"), _dest(good, "good")])
    ids = _queue(engine, _objects(tmp_path), settings.destinations)
    deliver(engine, settings, ids)
    rows = _rows(engine).values()
    dead = [r for r in rows if r.destination == "strict"]
    sent = [r for r in rows if r.destination == "good"]
    assert [r.state for r in dead] == ["dead", "dead"] and all(r.attempts == 1 for r in dead)
    assert all("association rejected (permanent)" in (r.last_error or "") for r in dead)
    assert all("calling AE title not recognised" in (r.last_error or "") for r in dead), dead[0].last_error
    assert [r.state for r in sent] == ["sent", "sent"]
    assert all(len(good.find_instance(r.sop_instance_uid)) == 1 for r in sent)
    assert strict.get("/instances") == []
    with session_scope(engine) as s:  # never retried on its own
        assert due_rows(s, lease_s=0.001) == []
        dead_audit = s.exec(select(AuditRecord).where(AuditRecord.action == "export.dead")).all()
    assert len(dead_audit) == 2 and all("not recognised" in a.details for a in dead_audit)


class _StallingProxy(threading.Thread):
    """Forwards a TCP connection to Orthanc, but holds back every PDU from Orthanc after the
    A-ASSOCIATE-AC: Orthanc stores the instance, the sender never hears so (then it is killed)."""

    def __init__(self, target_port: int) -> None:
        super().__init__(daemon=True)
        self.target_port = target_port
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.held = threading.Event()

    def run(self) -> None:
        client, _ = self.sock.accept()
        server = socket.create_connection(("127.0.0.1", self.target_port))

        def up() -> None:
            while data := client.recv(65536):
                server.sendall(data)

        threading.Thread(target=up, daemon=True).start()
        first = True
        while True:
            header = server.recv(6, socket.MSG_WAITALL)
            if len(header) < 6:
                return
            body = server.recv(int.from_bytes(header[2:6], "big"), socket.MSG_WAITALL)
            if first:
                client.sendall(header + body)
                first = False
            else:
                self.held.set()  # the C-STORE response: keep it


_WORKER = """
import json, sys
from integrations.dicom.destinations import ExportSettings
from integrations.dicom.export import deliver
from ground.db import make_engine
cfg = json.loads(sys.argv[2])
deliver(make_engine(sys.argv[1]), ExportSettings.model_validate(cfg), [int(sys.argv[3])])
"""


def test_worker_killed_mid_send_is_delivered_once(engine: Engine, db_url: str, tmp_path: Path,
                                                  orthanc_factory: Callable[..., OrthancServer]) -> None:
    pacs = orthanc_factory()
    proxy = _StallingProxy(pacs.dicom_port)
    proxy.start()
    via_proxy = Destination(name="pacs", ae_title=pacs.aet, host="127.0.0.1", port=proxy.port)
    slow = ExportSettings(destinations=[via_proxy], dimse_timeout=120, network_timeout=120, sending_lease=1)
    [obj] = _objects(tmp_path)[:1]
    [row_id] = _queue(engine, [obj], slow.destinations)
    worker = subprocess.Popen([sys.executable, "-c", _WORKER, db_url, slow.model_dump_json(), str(row_id)],
                              cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proxy.held.wait(30), "the worker never sent its C-STORE"
    deadline = time.monotonic() + 10
    while not pacs.find_instance(obj.sop_instance_uid) and time.monotonic() < deadline:
        time.sleep(0.05)
    worker.send_signal(signal.SIGKILL)
    worker.wait(timeout=10)
    row = _rows(engine)[row_id]
    assert row.state == "sending" and row.attempts == 1  # the PACS has it, the outbox does not know
    time.sleep(1.1)  # the lease runs out
    direct = ExportSettings(destinations=[_dest(pacs)], sending_lease=1)
    with session_scope(engine) as s:
        assert take_due(s, lease_s=1, redispatch_after_s=60) == [row_id]
    [done] = deliver(engine, direct, [row_id])
    assert done.state.value == "sent"
    row = _rows(engine)[row_id]
    assert row.attempts == 2 and row.sop_instance_uid == obj.sop_instance_uid
    assert len(pacs.find_instance(obj.sop_instance_uid)) == 1
    with session_scope(engine) as s:
        attempts = s.exec(select(AuditRecord).where(AuditRecord.action == "export.attempt")).all()
    assert [json.loads(a.details)["resent_after_lost_worker"] for a in attempts] == [False, True]


def test_destination_down_for_days_backs_off_to_the_cap_and_never_delays_another(
        engine: Engine, tmp_path: Path, orthanc_factory: Callable[..., OrthancServer]) -> None:
    good = orthanc_factory("good", aet="GOOD")
    # A host that accepts TCP but never answers the association: the worst kind of "down".
    silent = socket.create_server(("127.0.0.1", 0))
    down = Destination(name="down", ae_title="GONE", host="127.0.0.1", port=silent.getsockname()[1])
    refused = Destination(name="refused", ae_title="GONE", host="127.0.0.1", port=free_port())
    settings = ExportSettings(destinations=[down, refused, _dest(good, "good")], acse_timeout=2, connect_timeout=2,
                              backoff_initial=30, backoff_max=3600, give_up_after=7 * 86400)
    ids = _queue(engine, _objects(tmp_path), settings.destinations)
    t0 = time.monotonic()
    deliver(engine, settings, ids)
    rows = _rows(engine)
    sent = [r for r in rows.values() if r.destination == "good"]
    assert [r.state for r in sent] == ["sent", "sent"]
    for r in sent:  # sent while the silent destination was still waiting for its timeout
        assert r.sent_at is not None and (r.sent_at - rows[ids[0]].created_at).total_seconds() < 1.8
    assert time.monotonic() - t0 >= 2
    # Time passes: each retry waits twice as long, up to the cap; then, after a week, dead.
    gaps = []
    refused_ids = [i for i, r in rows.items() if r.destination == "refused"]
    for _ in range(9):
        with session_scope(engine) as s:
            s.exec(update(OutboxItem).where(OutboxItem.destination == "refused")
                   .values(next_attempt_at=utcnow() - timedelta(seconds=1)))
        deliver(engine, settings, refused_ids)
        row = _rows(engine)[refused_ids[0]]
        assert row.state == "failed"
        gaps.append(round((row.next_attempt_at - row.updated_at).total_seconds()))
    assert gaps == [60, 120, 240, 480, 960, 1920, 3600, 3600, 3600]  # the first (30 s) came above
    with session_scope(engine) as s:
        assert not set(due_rows(s, lease_s=600)) & set(refused_ids)
        s.exec(update(OutboxItem).where(OutboxItem.destination == "refused")
               .values(next_attempt_at=utcnow() - timedelta(seconds=1), first_failure_at=utcnow() - timedelta(days=8)))
    deliver(engine, settings, refused_ids)
    row = _rows(engine)[refused_ids[0]]
    assert row.state == "dead" and "gave up after 11 attempts" in (row.last_error or "")
    assert all(r.state == "sent" for r in _rows(engine).values() if r.destination == "good")
    silent.close()


@pytest.fixture
def _keep_logging() -> Iterator[None]:
    """The CLI's entry point configures the root logger onto CliRunner's stream, which is closed
    after the run: put the test session's handlers back."""
    import logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("_keep_logging")
def test_cli_lists_the_outbox_and_replays_dead_rows_once_the_pacs_is_fixed(
        engine: Engine, db_url: str, tmp_path: Path, orthanc_factory: Callable[..., OrthancServer]) -> None:
    from typer.testing import CliRunner

    from taqrir.cli import app

    pacs = orthanc_factory("strict", aet="STRICT", known_aes={"someone": ("SOMEONE", 104)}, refuse_unknown=True)
    settings = ExportSettings(destinations=[_dest(pacs, "strict")])
    ids = _queue(engine, _objects(tmp_path), settings.destinations)
    deliver(engine, settings, ids)
    env = {"TAQRIR_DATABASE_URL": db_url, "TAQRIR_DATA_DIR": str(tmp_path / "data"),
           "TAQRIR_EXPORT": json.dumps(settings.model_dump(mode="json"))}
    listed = CliRunner().invoke(app, ["outbox"], env=env)
    assert listed.exit_code == 0, listed.output
    assert "strict: 2 dead" in listed.output and "calling AE title not recognised" in listed.output
    # The PACS admin adds Taqrir to the PACS's modalities; then the dead rows are replayed.
    pacs.stop()
    pacs.known_aes["taqrir"] = ("TAQRIR", 104)
    pacs.start()
    replayed = CliRunner().invoke(app, ["outbox", "retry", "--dead"], env=env)
    assert replayed.exit_code == 0, replayed.output
    assert "replayed 2 row(s)" in replayed.output
    rows = _rows(engine)
    assert all(r.state == "sent" and r.attempts == 2 for r in rows.values()), [r.last_error for r in rows.values()]
    assert all(len(pacs.find_instance(r.sop_instance_uid)) == 1 for r in rows.values())
    sent = CliRunner().invoke(app, ["outbox", "--state", "sent", "--json"], env=env)
    assert sent.exit_code == 0 and len(sent.output.strip().splitlines()) == 2
    metrics = CliRunner().invoke(app, ["metrics"], env=env)
    assert 'taqrir_export_objects{destination="strict",state="sent"} 2.0' in metrics.output
    assert 'taqrir_export_attempts_total{destination="strict"} 4.0' in metrics.output


def test_storage_commitment_is_requested_and_recorded_per_object(
        engine: Engine, tmp_path: Path, orthanc_factory: Callable[..., OrthancServer]) -> None:
    pacs = orthanc_factory(known_aes={"taqrir": ("TAQRIR", free_port())})
    settings = ExportSettings(destinations=[_dest(pacs, storage_commitment=True)])
    ids = _queue(engine, _objects(tmp_path), settings.destinations)
    assert {d.state.value for d in deliver(engine, settings, ids)} == {"sent"}
    rows = _rows(engine).values()
    assert {r.commitment for r in rows} == {"requested"}
    [uid] = {r.commitment_uid for r in rows}
    assert uid and uid.startswith("2.25.")
    # the N-EVENT-REPORT's results, as the listener hands them over, land on the rows
    from integrations.dicom.outbox import record_commitment

    [first, second] = sorted(rows, key=lambda r: r.id or 0)
    with session_scope(engine) as s:
        assert record_commitment(s, transaction_uid=uid, committed=[first.sop_instance_uid],
                                 failed=[(second.sop_instance_uid, 0x0110)], peer=pacs.aet) == 2
    after = _rows(engine)
    assert after[first.id or 0].commitment == "committed"
    assert after[second.id or 0].commitment == "failed" and "0x0110" in (after[second.id or 0].last_error or "")


def test_missing_file_and_removed_destination_are_dead_with_the_reason(engine: Engine, tmp_path: Path) -> None:
    gone = Destination(name="gone", ae_title="GONE", host="127.0.0.1", port=free_port())
    here = Destination(name="here", ae_title="HERE", host="127.0.0.1", port=free_port())
    [obj] = _objects(tmp_path)[:1]
    missing = obj.model_copy(update={"location": str(tmp_path / "nowhere.dcm"), "sop_instance_uid": "2.25.42"})
    ids = _queue(engine, [obj, missing], [gone, here])
    deliver(engine, ExportSettings(destinations=[here]), ids)  # "gone" was removed from the settings
    rows = _rows(engine).values()
    assert {(r.destination, r.sop_instance_uid == "2.25.42", r.state) for r in rows} == {
        ("gone", False, "dead"), ("gone", True, "dead"), ("here", False, "failed"), ("here", True, "dead")}
    reasons = {r.last_error for r in rows if r.state == "dead"}
    assert any("no longer in export.destinations" in (x or "") for x in reasons)
    assert any("is missing" in (x or "") for x in reasons)


def test_storage_commitment_result_comes_back_to_the_listener(
        engine: Engine, tmp_path: Path, start_listener: Callable[..., Any],
        orthanc_factory: Callable[..., OrthancServer]) -> None:
    listener = start_listener()
    pacs = orthanc_factory(known_aes={"taqrir": ("TAQRIR", listener.port)})
    settings = ExportSettings(destinations=[_dest(pacs, storage_commitment=True)])
    ids = _queue(engine, _objects(tmp_path), settings.destinations)
    assert {d.state.value for d in deliver(engine, settings, ids)} == {"sent"}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and {r.commitment for r in _rows(engine).values()} != {"committed"}:
        time.sleep(0.2)
    assert {r.commitment for r in _rows(engine).values()} == {"committed"}
    with session_scope(engine) as s:
        [event] = s.exec(select(AuditRecord).where(AuditRecord.action == "export.commitment")).all()
    assert event.actor == "PACS" or event.actor == pacs.aet
    assert json.loads(event.details)["rows"] == 2
