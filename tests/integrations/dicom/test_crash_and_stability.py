"""A listener killed mid-transfer loses nothing it acknowledged; stability from DB timestamps."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dsutils import decode
from pynetdicom.sop_class import Verification
from sqlalchemy import update
from sqlalchemy.engine import Engine
from sqlmodel import select

from audit.chain import AuditRecord, verify
from ground.clock import utcnow
from ground.db import session_scope
from integrations.dicom.config import StudySettings
from integrations.dicom.headers import read_headers
from integrations.dicom.index import Instance, Study, StudyState
from integrations.dicom.listener import Listener
from integrations.dicom.stability import sweep_stable
from tests.conftest import free_port
from tests.factories.dcmtk import DCMTK_ENV, echoscu, storescu
from tests.factories.listener import alive, children, receivers, supervisor
from tests.factories.raw_peer import (
    CT_STORAGE,
    EXPLICIT_LE,
    associate_rq,
    dimse_command,
    p_data,
    read_pdu,
)
from tests.factories.studies import make_ct_series

CORPUS = Path(__file__).resolve().parents[2] / "data" / "dicom"


def _start_listener_process(data_dir: Path, db_url: str, port: int,
                            extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    env = {**os.environ, "TAQRIR_DATA_DIR": str(data_dir), "TAQRIR_DATABASE_URL": db_url,
           "TAQRIR_LISTENER__MIN_FREE_BYTES": "0", "TAQRIR_LISTENER__HOST": "127.0.0.1", **(extra_env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "taqrir", "listen", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if echoscu(port).returncode == 0:
            return proc
        time.sleep(0.3)
    proc.kill()
    raise AssertionError("listener did not start")


def test_sigkill_during_transfer_loses_no_acknowledged_instance(db_url: str, engine: Engine, tmp_path: Path) -> None:
    files = make_ct_series(tmp_path / "src", 80)
    sop_of = {str(p): str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files}
    port = free_port()
    data_dir = tmp_path / "data"
    proc = _start_listener_process(data_dir, db_url, port)
    sender = subprocess.Popen(
        ["storescu", "-v", "-aec", "TAQRIR", "-to", "5", "127.0.0.1", str(port), *map(str, files)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=DCMTK_ENV,
    )
    acknowledged: list[str] = []
    current = None
    assert sender.stdout is not None
    for line in sender.stdout:
        m = re.search(r"Sending file: (.*)$", line)
        if m:
            current = m.group(1).strip()
        if "Received Store Response (Success)" in line and current:
            acknowledged.append(sop_of[current])
            if len(acknowledged) == 25:
                proc.send_signal(signal.SIGKILL)  # mid-transfer: the next file is already on its way
    sender.wait(timeout=60)
    proc.wait(timeout=10)
    assert 25 <= len(acknowledged) < len(files)

    storage = data_dir / "storage"
    # Outside the staging folder every file is complete: its content hash is the one in its name
    # (sop.sha16.nonce.dcm), and its headers and Pixel Data extent check out.
    visible = [p for p in storage.rglob("*.dcm") if ".incoming" not in p.parts]
    for p in visible:
        assert hashlib.sha256(p.read_bytes()).hexdigest()[:16] == p.name.split(".")[-3]
        read_headers(p)
    # A restart files what the intake journal holds (acknowledged, maybe not indexed yet),
    # discards partial transfers and serves again.
    proc = _start_listener_process(data_dir, db_url, port)
    try:
        with session_scope(engine) as s:
            rows = {i.sop_instance_uid: i for i in s.exec(select(Instance)).all()}
        for sop in acknowledged:
            assert sop in rows, f"acknowledged {sop} missing after SIGKILL and restart"
            row = rows[sop]
            assert hashlib.sha256((storage / row.storage_key).read_bytes()).hexdigest() == row.sha256
        assert not any((storage / ".incoming").iterdir())
        run = storescu(port, files[len(acknowledged):])
        assert set(run.statuses()) == {"Success"}
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    with session_scope(engine) as s:
        assert len(s.exec(select(Instance)).all()) == len(files)


def test_stability_rearm_and_new_version(start_listener: Callable[..., Listener], engine: Engine) -> None:
    handed: list[tuple[str, int]] = []
    listener = start_listener(study=StudySettings(stable_after=1.0, sweep_interval=0.2),
                              handoff=lambda uid, v: handed.append((uid, v)))
    series = sorted((CORPUS / "mr" / "series_dcm4che_wrist").iterdir())
    assert storescu(listener.port, series[:8]).statuses() == ["Success"] * 8  # type: ignore[attr-defined]
    time.sleep(0.8)
    assert storescu(listener.port, series[8:12]).statuses() == ["Success"] * 4  # type: ignore[attr-defined]
    time.sleep(0.5)  # 1.3 s after the first batch: stable by now, had the late ones not re-armed it
    assert handed == []
    deadline = time.monotonic() + 10
    while not handed and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(handed) == 1 and handed[0][1] == 1
    uid = handed[0][0]
    with session_scope(engine) as s:
        study = s.exec(select(Study)).one()
        assert study.state == StudyState.stable.value
        # drafting happened for version 1
        study.state = StudyState.drafted.value
        s.add(study)
    assert storescu(listener.port, series[12:]).statuses() == ["Success"] * 4  # type: ignore[attr-defined]
    deadline = time.monotonic() + 10
    while len(handed) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert handed[1] == (uid, 2)
    with session_scope(engine) as s:
        study = s.exec(select(Study)).one()
        assert study.version == 2 and study.state == StudyState.stable.value
        stable_events = s.exec(select(AuditRecord).where(AuditRecord.action == "study.stable")).all()
        assert len(stable_events) == 2


def test_stability_survives_restart(engine: Engine, start_listener: Callable[..., Listener]) -> None:
    """Stability comes from timestamps in the database, so a sweep by a fresh process (here: a
    direct call, as after a restart) finds studies that went quiet while nobody was running."""
    listener = start_listener()
    assert storescu(listener.port, [CORPUS / "ct" / "pydicom_CT_small.dcm"]).statuses() == ["Success"]  # type: ignore[attr-defined]
    listener.stop()
    with session_scope(engine) as s:
        s.exec(update(Study).values(last_received_at=utcnow() - timedelta(minutes=5)))  # type: ignore[call-overload]
    got: list[tuple[str, int]] = []
    became = sweep_stable(engine, stable_after=30, handoff=lambda u, v: got.append((u, v)))
    assert became == got and len(got) == 1
    assert sweep_stable(engine, stable_after=30, handoff=lambda u, v: got.append((u, v))) == []


# The listener, with its group commits made to stop after the batch's files are placed and
# before the batch commits, telling the test which instances it holds (the window a SIGKILL
# would have to hit by chance otherwise).
_HELD_BATCH = """
import json, os, sys, time
from pathlib import Path
from storage import FileStorage
real = FileStorage.commit_new  # the ingest places files that never replace one
def held(self, placements):
    real(self, placements)
    if len(placements) >= 2:
        Path(os.environ["HELD_BATCH"]).write_text(json.dumps([Path(k).name for _, k in placements]))
        time.sleep(60)
FileStorage.commit_new = held
from taqrir.cli import main
sys.argv = ["taqrir", "listen", "--port", sys.argv[1]]
main()
"""


def test_sigkill_during_a_group_commit_loses_no_acknowledged_instance(db_url: str, engine: Engine,
                                                                       tmp_path: Path) -> None:
    """With the intake journal off, four associations share commits, each answered after its
    instance committed; the listener is killed while one batch of several is in
    flight (files placed, rows written, not committed). Every acknowledged instance is indexed
    with its file; the batch's instances were never acknowledged and are not indexed; a restart
    and a resend file everything once, with a chain that verifies."""
    files = make_ct_series(tmp_path / "src", 120, rows=64, cols=64)
    sop_of = {str(p): str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files}
    port = free_port()
    data_dir = tmp_path / "data"
    held = tmp_path / "held.json"
    env = {**os.environ, "TAQRIR_DATA_DIR": str(data_dir), "TAQRIR_DATABASE_URL": db_url,
           "TAQRIR_LISTENER__MIN_FREE_BYTES": "0", "TAQRIR_LISTENER__HOST": "127.0.0.1",
           "TAQRIR_LISTENER__GROUP_COMMIT_WAIT": "0.05", "HELD_BATCH": str(held),
           # files placed before the commit: the spool of small instances is test_spool's
           "TAQRIR_LISTENER__SPOOL_MAX_BYTES": "0",
           # the group commit that answers after the commit; the journal's is test_intake's
           "TAQRIR_LISTENER__INTAKE_JOURNAL": "false"}
    listener_log = tmp_path / "listener.log"
    with listener_log.open("wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-c", _HELD_BATCH, str(port)], env=env,
                                stdout=log_file, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while echoscu(port).returncode != 0:
        assert time.monotonic() < deadline, "listener did not start"
        time.sleep(0.3)
    # the series' first instance alone, then four associations at once
    assert set(storescu(port, files[:1]).statuses()) == {"Success"}
    senders = [subprocess.Popen(
        ["storescu", "-v", "-aec", "TAQRIR", "-to", "5", "127.0.0.1", str(port), *map(str, files[1 + i::4])],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=DCMTK_ENV) for i in range(4)]
    deadline = time.monotonic() + 60
    while not held.exists():
        if time.monotonic() > deadline:  # say why: what each sender and the listener last said
            proc.kill()
            tails = []
            for i, sender in enumerate(senders):
                sender.kill()
                out = sender.communicate()[0]
                tails.append(f"--- sender {i} (exit {sender.returncode}):\n" + "\n".join(out.splitlines()[-15:]))
            raise AssertionError("no group commit of several instances happened in 60 s\n" + "\n".join(tails)
                                 + "\n--- listener:\n" + listener_log.read_text(errors="replace")[-4000:])
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    acknowledged = {sop_of[str(files[0])]}
    for sender in senders:
        out, _ = sender.communicate(timeout=60)
        current = None
        for line in out.splitlines():
            m = re.search(r"Sending file: (.*)$", line)
            if m:
                current = m.group(1).strip()
            if "Received Store Response (Success)" in line and current:
                acknowledged.add(sop_of[current])
    in_flight = json.loads(held.read_text())
    assert len(in_flight) >= 2

    storage = data_dir / "storage"
    with session_scope(engine) as s:
        rows = {i.sop_instance_uid: i for i in s.exec(select(Instance)).all()}
    assert acknowledged <= set(rows), "acknowledged instances missing after SIGKILL"
    for sop in acknowledged:
        row = rows[sop]
        assert hashlib.sha256((storage / row.storage_key).read_bytes()).hexdigest() == row.sha256
    assert not {Path(r.storage_key).name for r in rows.values()} & set(in_flight)  # never committed
    assert len(rows) < len(files)

    # A restart serves again; resending everything files each instance once.
    proc = _start_listener_process(data_dir, db_url, port)
    try:
        run = storescu(port, files)
        assert set(run.statuses()) == {"Success"}
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    with session_scope(engine) as s:
        rows = {i.sop_instance_uid: i for i in s.exec(select(Instance)).all()}
        assert len(rows) == len(files)
        assert verify(s).ok
    for row in rows.values():
        assert hashlib.sha256((storage / row.storage_key).read_bytes()).hexdigest() == row.sha256


def _server_pids(port: int) -> set[int]:
    """The processes holding the server side of established connections to ``port``."""
    out = subprocess.run(["ss", "-Htnp", "state", "established", f"sport = :{port}"],
                         capture_output=True, text=True, check=True).stdout
    return {int(pid) for pid in re.findall(r"pid=(\d+),", out)}


def test_prefork_receivers_file_parallel_associations_once(db_url: str, engine: Engine, tmp_path: Path) -> None:
    """``listener.processes=2``: two receiving processes accept on one socket. Both serve
    associations; four associations of small (spooled) instances at once are all acknowledged,
    each instance filed once with its file, and the audit chain both wrote verifies (on SQLite
    their transactions queue on the writer flock)."""
    files = make_ct_series(tmp_path / "src", 160, rows=64, cols=64)
    port = free_port()
    data_dir = tmp_path / "data"
    proc = _start_listener_process(data_dir, db_url, port, {"TAQRIR_LISTENER__PROCESSES": "2"})
    try:
        children = set(receivers(proc.pid))
        assert len(children) == 1, f"expected one pre-forked receiver, found {children}"
        # Held-open associations until each process has accepted one (the kernel picks).
        ae = AE(ae_title="PROBE")
        ae.add_requested_context(Verification)
        held: list[Association] = []
        try:
            while _server_pids(port) != {proc.pid, *children}:
                assert len(held) < 24, f"only {_server_pids(port)} accepted {len(held)} associations"
                assoc = ae.associate("127.0.0.1", port, ae_title="TAQRIR")
                assert assoc.is_established
                held.append(assoc)
        finally:
            for assoc in held:
                assoc.release()
        senders = [subprocess.Popen(
            ["storescu", "-v", "-aec", "TAQRIR", "-to", "5", "127.0.0.1", str(port), *map(str, files[i::4])],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=DCMTK_ENV) for i in range(4)]
        successes = 0
        for sender in senders:
            out, _ = sender.communicate(timeout=120)
            assert sender.returncode == 0, out[-2000:]
            successes += out.count("Received Store Response (Success)")
        assert successes == len(files)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    storage = data_dir / "storage"
    with session_scope(engine) as s:
        rows = s.exec(select(Instance)).all()
        assert verify(s).ok
    assert sorted(r.sop_instance_uid for r in rows) == sorted(
        str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files)
    for row in rows:
        assert hashlib.sha256((storage / row.storage_key).read_bytes()).hexdigest() == row.sha256


def test_sigterm_lets_running_associations_finish_and_refuses_new_ones(db_url: str, engine: Engine,
                                                                     tmp_path: Path) -> None:
    """``systemctl stop`` (SIGTERM) while a PACS is sending: each running association, in the
    parent and in a receiving process, sends its last instances and is released normally; a new
    connection is refused at once; the listener then exits and every instance is indexed.
    Before, the stop cut both associations and the sender had to send again."""
    files = make_ct_series(tmp_path / "src", 12, rows=64, cols=64)
    first = dcmread(files[0], stop_before_pixels=True)
    port = free_port()
    proc = _start_listener_process(tmp_path / "data", db_url, port, {"TAQRIR_LISTENER__PROCESSES": "2",
                                                                     "TAQRIR_LISTENER__STOP_TIMEOUT": "30"})
    ae = AE(ae_title="SENDER")
    ae.add_requested_context(first.SOPClassUID, first.file_meta.TransferSyntaxUID)
    held: list[Association] = []
    try:
        held = [ae.associate("127.0.0.1", port, ae_title="TAQRIR") for _ in range(2)]
        assert all(assoc.is_established for assoc in held)
        assert _server_pids(port) == {proc.pid, *receivers(proc.pid)}  # one in each process
        statuses = [assoc.send_c_store(files[i]).Status for i, assoc in enumerate(held)]
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        started = time.monotonic()
        assert echoscu(port).returncode != 0  # refused: the listener is stopping
        assert time.monotonic() - started < 3  # at once, not after the sender's own timeout
        assert proc.poll() is None
        for i in range(2, len(files)):
            statuses.append(held[i % 2].send_c_store(files[i]).Status)
            time.sleep(0.05)
        for assoc in held:
            assoc.release()
            assert assoc.is_released
        assert statuses == [0x0000] * len(files)
        assert proc.wait(timeout=30) == 0
    finally:
        for assoc in held:
            if assoc.is_established:
                assoc.abort()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with session_scope(engine) as s:
        uids = sorted(r.sop_instance_uid for r in s.exec(select(Instance)).all())
    assert uids == sorted(str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files)


def test_a_receiving_process_dies_with_its_killed_parent(db_url: str, tmp_path: Path) -> None:
    """SIGKILL of the parent ends the pre-forked receivers at once (not after their one-second
    poll): a child left behind kept the port and its journal segment, so a restart could neither
    bind nor replay what the child had acknowledged."""
    port = free_port()
    proc = _start_listener_process(tmp_path / "data", db_url, port, {"TAQRIR_LISTENER__PROCESSES": "2"})
    children = receivers(proc.pid)
    assert len(children) == 1
    children.append(supervisor(proc.pid) or 0)
    time.sleep(1.2)  # the child is serving (its parent watch and its journal are up)
    proc.kill()
    proc.wait(timeout=10)
    deadline = time.monotonic() + 0.5
    while any(map(alive, children)):
        assert time.monotonic() < deadline, "a receiving process outlived its killed parent"
        time.sleep(0.02)
    restarted = _start_listener_process(tmp_path / "data", db_url, port)
    restarted.terminate()
    restarted.wait(timeout=20)


@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0,
                    reason="runs the listener as PID 1 of a new PID namespace (util-linux unshare, root)")
def test_a_listener_running_as_pid_1_reaps_its_killed_supervisor_s_receivers(db_url: str, tmp_path: Path) -> None:
    """Orphans are given to PID 1: a listener running as PID 1 (a container without an init)
    inherits the receivers that die with its killed supervisor, and they stayed zombies for as
    long as it ran. It now reaps them once their files are gone."""
    port = free_port()
    env = {**os.environ, "TAQRIR_DATA_DIR": str(tmp_path / "data"), "TAQRIR_DATABASE_URL": db_url,
           "TAQRIR_LISTENER__MIN_FREE_BYTES": "0", "TAQRIR_LISTENER__HOST": "127.0.0.1",
           "TAQRIR_LISTENER__PROCESSES": "2", "TAQRIR_STUDY__SWEEP_INTERVAL": "0.2"}
    outer = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-m", "taqrir", "listen",
                              "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while echoscu(port).returncode != 0:
            assert outer.poll() is None and time.monotonic() < deadline, "the listener did not start"
            time.sleep(0.3)
        (listener,) = children(outer.pid)
        (nspid,) = [line for line in Path(f"/proc/{listener}/status").read_text().splitlines()
                    if line.startswith("NSpid:")]
        assert nspid.split()[-1] == "1"  # PID 1 in its namespace
        (receiver,) = receivers(listener)
        sup = supervisor(listener)
        assert sup is not None
        os.kill(sup, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{receiver}").exists():
            assert time.monotonic() < deadline, f"the dead receiver stayed (state {_state(receiver)})"
            time.sleep(0.05)
        assert storescu(port, make_ct_series(tmp_path / "src", 1)).statuses() == ["Success"]
    finally:
        for pid in children(outer.pid) if outer.poll() is None else []:
            os.kill(pid, signal.SIGTERM)
        try:
            outer.wait(timeout=20)
        except subprocess.TimeoutExpired:
            outer.kill()
            outer.wait()


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


#: what a partial transfer sends before it stops: above ``spool_max_bytes``, so on disk
_PARTIAL = 8 * 65536


def _start_partial_transfer(port: int, message_id: int, path: Path) -> socket.socket:
    """An association whose C-STORE of ``path`` stops half-way: its command and the first
    ``_PARTIAL`` bytes of its dataset, then nothing (:func:`_finish_transfer` sends the rest)."""
    sop = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(associate_rq(contexts=[(1, CT_STORAGE, EXPLICIT_LE)]))
    assert read_pdu(sock)[0] == 0x02  # A-ASSOCIATE-AC
    sock.sendall(p_data(1, 0x03, dimse_command(0x0001, message_id, has_dataset=True, sop_instance=sop)))
    dataset = _dataset(path)
    assert len(dataset) > _PARTIAL
    for start in range(0, _PARTIAL, 65536):
        sock.sendall(p_data(1, 0x00, dataset[start:start + 65536]))
    return sock


def _dataset(path: Path) -> bytes:
    """A Part 10 file's data set, after its File Meta Information (Explicit VR Little Endian)."""
    data = path.read_bytes()
    return data[132 + 12 + struct.unpack("<L", data[140:144])[0]:]


def _staged_by(incoming: Path, pid: int) -> list[str]:
    """The partial transfers of process ``pid`` (staging files are named after their process)."""
    return [p.name for p in incoming.iterdir() if p.name.startswith(f"{pid}-")]


def _partial_transfer_in_each(port: int, incoming: Path, listener: int, slices: list[Path], *,
                              most: int, socks: list[socket.socket]) -> tuple[int, int]:
    """Associations at once, appended to ``socks``, until the listener (``listener.processes=2``)
    and its receiver each hold a partial transfer (they spread evenly), ``most`` of them at the
    most. Returns the receiver's pid and the supervisor's."""
    (receiver,) = receivers(listener)
    sup = supervisor(listener)
    assert sup is not None
    pids = (receiver, listener)
    while not all(_staged_by(incoming, pid) for pid in pids):
        assert len(socks) < most, f"no partial transfer in each process: {sorted(incoming.iterdir())}"
        socks.append(_start_partial_transfer(port, len(socks) + 1, slices[len(socks)]))
        deadline = time.monotonic() + 2
        while sum(len(_staged_by(incoming, pid)) for pid in pids) < len(socks) and time.monotonic() < deadline:
            time.sleep(0.05)
    return receiver, sup


@pytest.mark.parametrize("killed", ["receiver", "supervisor"])
def test_a_dead_receiver_s_partial_transfers_and_spares_are_removed(db_url: str, tmp_path: Path, killed: str) -> None:
    """A receiving process killed mid-transfer (the OOM killer, say) left its staging files (a
    whole-slide image's gigabytes) and its spares in the storage until the listener's next
    start, however many times it was replaced: its supervisor now removes them when it reaps
    it. A supervisor killed (an operator's wrong pid) takes its receivers with it and the
    listener receives alone: it now removes their files once they are gone (at a sweep). Either
    way the listener's own transfers in flight are left alone and complete."""
    slices = make_ct_series(tmp_path / "src", 5)
    port = free_port()
    data_dir = tmp_path / "data"
    proc = _start_listener_process(data_dir, db_url, port, {"TAQRIR_LISTENER__PROCESSES": "2",
                                                           "TAQRIR_STUDY__SWEEP_INTERVAL": "0.2"})
    incoming, spares = data_dir / "storage" / ".incoming", data_dir / "storage" / ".spare"

    def made_by(pid: int) -> list[str]:  # staging and spare files are named after their process
        return [p.name for folder in (incoming, spares) for p in folder.iterdir() if p.name.startswith(f"{pid}-")]

    def staged_by(pid: int) -> list[str]:
        return _staged_by(incoming, pid)

    socks: list[socket.socket] = []
    try:
        receiver, sup = _partial_transfer_in_each(port, incoming, proc.pid, slices, most=4, socks=socks)
        parents = staged_by(proc.pid)
        assert made_by(receiver)
        os.kill(receiver if killed == "receiver" else sup, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while made_by(receiver):
            assert time.monotonic() < deadline, f"{len(made_by(receiver))} files of the dead receiver stayed"
            time.sleep(0.05)
        assert not alive(receiver)
        assert set(parents) <= set(staged_by(proc.pid)), "the listener's own partial transfers were removed"
        if killed == "receiver":
            deadline = time.monotonic() + 10
            while [pid for pid in receivers(proc.pid) if pid != receiver] == []:
                assert time.monotonic() < deadline, "the dead receiver was not replaced"
                time.sleep(0.1)
        # the listener's associations go on: the rest of each data set, and each slice is stored
        stored = 0
        for sock, path in zip(socks, slices, strict=False):
            try:
                sock.sendall(p_data(1, 0x02, _dataset(path)[_PARTIAL:]))
                pdu_type, raw = read_pdu(sock)
            except OSError:
                continue  # one of the dead receiver's connections
            rsp = decode(io.BytesIO(raw[12:]), True, True)
            assert pdu_type == 0x04 and (rsp.CommandField, rsp.Status) == (0x8001, 0x0000)
            stored += 1
        assert stored == len(parents)
        # and a new association is stored (by the listener alone, after a killed supervisor)
        assert storescu(port, [slices[-1]]).statuses() == ["Success"]
    finally:
        for sock in socks:
            sock.close()
        proc.terminate()
        proc.wait(timeout=20)



def test_a_killed_supervisor_frees_its_receivers_associations_and_files_at_once(db_url: str, tmp_path: Path) -> None:
    """A killed supervisor's receivers die with it, and with them their associations. Until the
    next sweep (``study.sweep_interval``, 60 s here) their slots still counted those
    associations, so that a listener at ``listener.max_associations`` refused every new one,
    and their partial transfers stayed. The listener now watches the supervisor (a pidfd) and
    frees both within moments."""
    slices = make_ct_series(tmp_path / "src", 3)
    port = free_port()
    data_dir = tmp_path / "data"
    proc = _start_listener_process(data_dir, db_url, port, {"TAQRIR_LISTENER__PROCESSES": "2",
                                                           "TAQRIR_LISTENER__MAX_ASSOCIATIONS": "2",
                                                           "TAQRIR_STUDY__SWEEP_INTERVAL": "60"})
    incoming = data_dir / "storage" / ".incoming"
    socks: list[socket.socket] = []
    try:
        # the listener's whole limit: one association in each process, each mid-transfer
        receiver, sup = _partial_transfer_in_each(port, incoming, proc.pid, slices, most=2, socks=socks)
        os.kill(sup, signal.SIGKILL)
        killed = time.monotonic()
        while storescu(port, [slices[-1]], timeout=30).statuses() != ["Success"]:
            assert time.monotonic() - killed < 3, "new associations were still refused 3 s after the supervisor died"
            time.sleep(0.1)
        while _staged_by(incoming, receiver):
            assert time.monotonic() - killed < 3, "the dead receiver's partial transfer stayed"
            time.sleep(0.05)
        assert _staged_by(incoming, proc.pid), "the listener's own partial transfer was removed"
    finally:
        for sock in socks:
            sock.close()
        proc.terminate()
        proc.wait(timeout=20)
