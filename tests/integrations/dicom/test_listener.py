"""The listener against real peers (DCMTK storescu/echoscu, raw pynetdicom) over real databases."""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import struct
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE
from sqlalchemy.engine import Engine
from sqlmodel import select

from audit.chain import AuditRecord, verify
from ground.db import session_scope
from integrations.dicom.config import ListenerSettings, StudySettings
from integrations.dicom.index import Instance, Patient, Series, Study
from integrations.dicom.intake import SEGMENT_BYTES
from integrations.dicom.listener import Listener, _say_ready
from storage import FileStorage
from tests.factories.dcmtk import dcmsend, echoscu, send_raw, storescu
from tests.factories.exfat import mounted_exfat
from tests.factories.studies import make_ct_series

CORPUS = Path(__file__).resolve().parents[2] / "data" / "dicom"

#: Files no real sender can transmit (no meta to name their transfer syntax or SOP class, or not
#: parseable by any sender): these never reach a listener, so they are not sent.
UNSENDABLE = {
    "malformed/pydicom_meta_missing_tsyntax.dcm": "file meta lacks Transfer Syntax UID",
    "malformed/fodicom_GH177_CT1_IVRLE_BigEndian_undefined_length.dcm": "unparseable by senders",
    "malformed/pydicom_ExplVR_BigEndNoMeta.dcm": "no file meta",
    "malformed/pydicom_ExplVR_LitEndNoMeta.dcm": "no file meta",
    "malformed/pydicom_no_meta_CT.dcm": "no file meta",
    "malformed/dcm4che_no_preamble_dicm_in_data": "no file meta",
    "cr_dx/fodicom_CR-MONO1-10-chest.dcm": "ACR-NEMA file without meta",
    "other/dicomdir_pcir/DICOMDIR": "a DICOMDIR is a media directory, not a storage instance",
    "charset/pydicom_chrSQEncoding.dcm": "no SOP class in meta",
    "charset/pydicom_chrSQEncoding1.dcm": "no SOP class in meta",
    "other/pydicom-data_HTJ2KLossless_08_RGB.dcm": "no SOP Instance UID in meta",
    "malformed/pydicom-data_explicit_VR-UN_CT.dcm": "no SOP class in meta",
}

#: Files DCMTK will not send (a transfer syntax it does not know); streamed as is by pynetdicom.
DCMTK_CANNOT_SEND = {
    "malformed/dcm4che_will-jxl.dcm",  # JPEG XL
    "malformed/pydicom-data_liver_deflate_SEG.dcm",  # Deflated Image Frame Compression
    "malformed/pynetdicom_CTImageStorage_bad_meta.dcm",  # meta lacks the SOP class
    "xa_nm_pt/dcm4che_NM-MONO2-16-13x-heart.dcm",  # meta lacks the SOP class
    "us/fodicom_DIRW0007_echo_cine.dcm",  # DCMTK's parser rejects an item delimiter pydicom accepts
}

#: Sent, and refused by the listener with this status: explicitly listed so a change is noticed.
REFUSED = {
    "malformed/pydicom_MR_truncated.dcm": 0xC210,  # Pixel Data shorter than declared
    "malformed/pydicom-data_emri_small_jpeg_2k_lossless_too_short.dcm": 0xC210,  # fragments cut
    "malformed/pydicom_UN_sequence.dcm": 0xA900,  # no Study Instance UID
    "malformed/pydicom-data_bad_sequence_CT.dcm": 0xA900,  # SOP Instance UID is not a UID
}

#: Refused when streamed raw: the file meta announces a SOP Instance UID that the dataset does
#: not carry (0xA900). DCMTK announces the dataset's own UID, so its sends of these succeed.
META_MISMATCH = {
    "charset/pydicom_chrJapMulti.dcm": 0xA900,
    "charset/pydicom_chrJapMultiExplicitIR6.dcm": 0xA900,
    "cr_dx/fodicom_CR-ModalitySequenceLUT.dcm": 0xA900,
    "malformed/pydicom_badVR_rtdose.dcm": 0xA900,
}


def corpus_files() -> list[Path]:
    return sorted(p for p in CORPUS.rglob("*") if p.is_file() and not p.name.endswith(".md"))


def rel(p: Path) -> str:
    return p.relative_to(CORPUS).as_posix()


def dataset_bytes(path: Path) -> bytes:
    """The encoded dataset after the file meta: what travels in a C-STORE."""
    raw = path.read_bytes()
    if raw[128:132] != b"DICM":
        return raw
    # (0002,0000) UL File Meta Information Group Length, explicit VR little endian (PS3.10 7.1)
    meta_len = struct.unpack("<L", raw[140:144])[0]
    return raw[144 + meta_len:]


def instances(engine: Engine) -> dict[str, Instance]:
    with session_scope(engine) as s:
        return {i.sop_instance_uid: i for i in s.exec(select(Instance)).all()}


def test_echo(start_listener: Callable[..., Listener]) -> None:
    listener = start_listener()
    res = echoscu(listener.port)  # type: ignore[attr-defined]
    assert res.returncode == 0, res.stderr


def test_every_sendable_file_is_stored_byte_identical_or_refused(
    start_listener: Callable[..., Listener], engine: Engine
) -> None:
    """A raw sender streams each file's dataset exactly as it is on disk, so what we store can be
    compared byte for byte with the source."""
    listener = start_listener()
    port = listener.port  # type: ignore[attr-defined]
    sent: dict[str, Path] = {}  # SOP Instance UID -> last file sent with it
    refused_seen: dict[str, int | None] = {}
    for path in corpus_files():
        r = rel(path)
        if r in UNSENDABLE:
            continue
        status = send_raw(port, path)
        if r in REFUSED or r in META_MISMATCH:
            refused_seen[r] = status
            continue
        assert status == 0x0000, f"{r}: 0x{status or 0:04X}"
        sop = str(dcmread(path, stop_before_pixels=True, force=True).SOPInstanceUID)
        sent[sop] = path
    assert refused_seen == {**REFUSED, **META_MISMATCH}
    # the listener kept serving through the refusals
    assert echoscu(port).returncode == 0

    stored = instances(engine)
    assert set(stored) == set(sent)
    for sop, path in sent.items():
        row = stored[sop]
        file = listener.storage.path(row.storage_key)
        assert hashlib.sha256(file.read_bytes()).hexdigest() == row.sha256
        assert dataset_bytes(file) == dataset_bytes(path), f"{rel(path)} not stored as sent"
        assert row.calling_ae == "RAWSCU"
    # Nothing half-stored: no staged leftovers, and every stored file has its row.
    assert not any(listener.storage.tmp_dir.iterdir())
    keys = {i.storage_key for i in stored.values()}
    on_disk = {p.relative_to(listener.storage.root).as_posix() for p in listener.storage.root.rglob("*.dcm")}
    assert on_disk == keys
    with session_scope(engine) as s:
        assert verify(s).ok
        actions = {a.action for a in s.exec(select(AuditRecord)).all()}
        assert {"association.accepted", "instance.new", "instance.replaced", "instance.rejected"} <= actions


def test_dcmtk_sends_the_corpus(start_listener: Callable[..., Listener], engine: Engine) -> None:
    """DCMTK's dcmsend (each file's own transfer syntax) and storescu (uncompressed) as the PACS."""
    listener = start_listener()
    port = listener.port  # type: ignore[attr-defined]
    files = [p for p in corpus_files() if rel(p) not in set(UNSENDABLE) | DCMTK_CANNOT_SEND | set(REFUSED)]
    run = dcmsend(port, files)
    assert run.statuses() == ["Success"] * len(files), run.output[-2000:]
    uncompressed = sorted((CORPUS / "mr" / "series_dcm4che_wrist").iterdir())
    assert storescu(port, uncompressed).statuses() == ["Success"] * len(uncompressed)
    stored = instances(engine)
    expected = {str(dcmread(p, stop_before_pixels=True, force=True).SOPInstanceUID) for p in files + uncompressed}
    assert set(stored) == expected
    for row in stored.values():
        file = listener.storage.path(row.storage_key)
        assert hashlib.sha256(file.read_bytes()).hexdigest() == row.sha256


def test_text_decoded_by_specific_character_set(start_listener: Callable[..., Listener], engine: Engine) -> None:
    listener = start_listener()
    files = [CORPUS / "charset" / n for n in ("pydicom_chrArab.dcm", "pydicom_chrX1.dcm", "pydicom_chrGreek.dcm")]
    assert dcmsend(listener.port, files).statuses() == ["Success"] * 3  # type: ignore[attr-defined]
    with session_scope(engine) as s:
        names = {p.patient_id: p.name for p in s.exec(select(Patient)).all()}
    assert names["SCSARAB"] == "قباني^لنزار"
    assert names["X1EXAMPLE"] == "Wang^XiaoDong=王^小東"
    assert names["SCSGREEK"] == "Διονυσιος"


def test_index_holds_what_drafting_needs(start_listener: Callable[..., Listener], engine: Engine) -> None:
    listener = start_listener()
    series_dir = CORPUS / "mr" / "series_dcm4che_wrist"
    run = storescu(listener.port, sorted(series_dir.iterdir()))  # type: ignore[attr-defined]
    assert run.statuses() == ["Success"] * 16
    with session_scope(engine) as s:
        study = s.exec(select(Study)).one()
        series = s.exec(select(Series)).one()
        rows = s.exec(select(Instance)).all()
    assert study.state == "receiving" and study.version == 1
    assert series.modality == "MR"
    assert len(rows) == 16 and all(r.image_position_patient and r.image_orientation_patient for r in rows)
    assert all(r.size > 0 and len(r.sha256) == 64 for r in rows)


def test_duplicate_and_replacement(start_listener: Callable[..., Listener], engine: Engine, tmp_path: Path) -> None:
    listener = start_listener()
    port = listener.port  # type: ignore[attr-defined]
    src = CORPUS / "ct" / "pydicom_CT_small.dcm"
    assert storescu(port, [src]).statuses() == ["Success"]
    assert storescu(port, [src]).statuses() == ["Success"]
    first = instances(engine)
    assert len(first) == 1
    # same SOP Instance UID, different bytes
    ds = dcmread(src)
    ds.StudyDescription = "changed by the modality"
    changed = tmp_path / "changed.dcm"
    ds.save_as(changed)
    assert storescu(port, [changed]).statuses() == ["Success"]
    after = instances(engine)
    (sop,) = after
    assert after[sop].sha256 != first[sop].sha256
    assert not listener.storage.path(first[sop].storage_key).exists()
    assert listener.storage.path(after[sop].storage_key).exists()
    with session_scope(engine) as s:
        actions = [a.action for a in s.exec(select(AuditRecord).order_by(AuditRecord.seq)).all()]
    assert actions.count("instance.new") == 1
    assert actions.count("instance.duplicate") == 1
    assert actions.count("instance.replaced") == 1


def test_four_concurrent_associations(start_listener: Callable[..., Listener], engine: Engine) -> None:
    listener = start_listener()
    files = sorted((CORPUS / "mr" / "series_dcm4che_wrist").iterdir())
    chunks = [files[i::4] for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        runs = list(pool.map(lambda c: storescu(listener.port, c), chunks))  # type: ignore[attr-defined]
    assert [len(r.statuses()) for r in runs] == [len(c) for c in chunks]
    assert all(set(r.statuses()) == {"Success"} for r in runs)
    assert len(instances(engine)) == 16


def test_allow_lists(start_listener: Callable[..., Listener]) -> None:
    listener = start_listener(allowed_calling_aes=["GOODPACS"])
    assert echoscu(listener.port, calling="GOODPACS").returncode == 0  # type: ignore[attr-defined]
    assert echoscu(listener.port, calling="STRANGER").returncode != 0  # type: ignore[attr-defined]
    hosts = start_listener(allowed_hosts=["10.99.0.0/16"])
    assert echoscu(hosts.port).returncode != 0  # type: ignore[attr-defined]


def test_low_disk_refuses_associations_and_stores(start_listener: Callable[..., Listener], engine: Engine,
                                                  tmp_path: Path) -> None:
    refusing = start_listener(min_free_bytes=1 << 62)
    assert echoscu(refusing.port).returncode != 0  # type: ignore[attr-defined]
    # enough space to associate, not enough for this 18 MB instance on top of the floor (a 10 MB
    # margin keeps the test steady while other files come and go on the disk)
    (big,) = make_ct_series(tmp_path / "big", 1, rows=3000, cols=3000)
    probe = start_listener()
    free = probe.storage.free_bytes()
    # (less the intake journal's segment, preallocated when the listener starts)
    tight = start_listener(min_free_bytes=max(free - 10_000_000 - SEGMENT_BYTES, 1))
    status = send_raw(tight.port, big)  # type: ignore[attr-defined]
    assert status == 0xA700
    assert instances(engine) == {}
    assert not any(tight.storage.tmp_dir.iterdir())


def test_hostile_traffic_does_not_lock_out_senders(start_listener: Callable[..., Listener]) -> None:
    listener = start_listener(max_associations=2, acse_timeout=2, network_timeout=2)
    port = listener.port  # type: ignore[attr-defined]
    junk = []
    for payload in (b"\x00" * 7, b"GET / HTTP/1.0\r\n\r\n", b"\x01\x00\x00\x00\xff\xff\xff\xff" + b"A" * 64):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(payload)
        junk.append(s)
    half_open = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    t0 = time.monotonic()
    while time.monotonic() - t0 < 15:
        if echoscu(port).returncode == 0:
            break
        time.sleep(0.5)
    else:
        pytest.fail("a normal C-ECHO never succeeded after junk connections")
    assert time.monotonic() - t0 < 10
    assert storescu(port, [CORPUS / "ct" / "pydicom_CT_small.dcm"]).statuses() == ["Success"]
    for s in junk + half_open:
        s.close()


def test_pynetdicom_peer_with_odd_but_legal_request(start_listener: Callable[..., Listener]) -> None:
    """A tiny maximum PDU and an unusual context list must still work (reliability notes)."""
    listener = start_listener()
    ae = AE(ae_title="ODDPEER")
    ae.maximum_pdu_size = 1024
    ds = dcmread(CORPUS / "ct" / "pydicom_CT_small.dcm")
    ae.add_requested_context(ds.SOPClassUID, [ds.file_meta.TransferSyntaxUID])
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="TAQRIR")  # type: ignore[attr-defined]
    assert assoc.is_established
    status = assoc.send_c_store(ds)
    assoc.release()
    assert status.Status == 0x0000


@pytest.mark.parametrize("levels", [100, 1200])
def test_deeply_nested_sequences_are_refused_and_serving_goes_on(
    start_listener: Callable[..., Listener], tmp_path: Path, levels: int
) -> None:
    """DCMTK's storescp overflowed its stack on thousands of nested levels (RELIABILITY-NOTES)."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    listener = start_listener()
    ds = dcmread(CORPUS / "ct" / "pydicom_CT_small.dcm")
    inner = Dataset()
    inner.CodeValue = "X"
    for _ in range(levels):
        outer = Dataset()
        outer.ReferencedImageSequence = Sequence([inner])
        inner = outer
    ds.ReferencedImageSequence = inner.ReferencedImageSequence
    path = tmp_path / "nested.dcm"
    import sys

    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, levels * 20))
    try:
        ds.save_as(path)
    finally:
        sys.setrecursionlimit(old)
    assert send_raw(listener.port, path) == 0xC210  # type: ignore[attr-defined]
    assert storescu(listener.port, [CORPUS / "ct" / "pydicom_CT_small.dcm"]).statuses() == ["Success"]  # type: ignore[attr-defined]


def test_request_stop_is_safe_wherever_the_signal_lands(start_listener: Callable[..., Listener]) -> None:
    """``taqrir listen`` calls request_stop from its SIGTERM handler, which Python runs in the
    main thread between two bytecodes: possibly inside :meth:`Listener.wait`'s own
    ``Event.wait``, while that thread holds the event's (non-reentrant) lock. Setting the event
    there blocked the handler on a lock its own thread held, and the stop hung until the service
    manager killed it. Reproduced without a signal: the lock held, then request_stop on the same
    thread."""
    import threading

    listener = start_listener()
    returned = threading.Event()

    def handler_inside_wait() -> None:
        with listener._stop._cond:  # where Event.wait holds it
            listener.request_stop()
        returned.set()

    threading.Thread(target=handler_inside_wait, daemon=True).start()
    assert returned.wait(5), "request_stop blocked on the lock its own thread held"
    started = time.monotonic()
    listener.wait()  # returns: the stop was requested
    assert time.monotonic() - started < 2


def test_a_receiving_process_s_stop_is_safe_wherever_the_signal_lands(start_listener: Callable[..., Listener]) -> None:
    """A receiving process's SIGTERM handler stops its accept loop. It used to call
    ``StorageScp.shutdown``, which sets an ``Event``: a handler landing while the main thread held
    that event's lock (inside the accept loop's ``Event.wait``, or inside a first SIGTERM's
    ``set`` when a service manager's and the supervisor's arrive together) blocked for ever, and
    the listener killed that receiver after stop_timeout + 15 s. The handler now calls
    ``request_stop``. Reproduced without a signal: the lock held, then the call on the same
    thread; the accept loop then returns."""
    import threading

    listener = start_listener()
    server = listener._server
    assert server is not None
    returned = threading.Event()

    def handler_inside_set() -> None:
        with server._stop._cond:  # where Event.wait and Event.set hold it
            server.request_stop()
        returned.set()

    threading.Thread(target=handler_inside_set, daemon=True).start()
    assert returned.wait(5), "the receiver's stop blocked on the lock its own thread held"
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    serving.join(2)
    assert not serving.is_alive(), "the accept loop did not see the stop"


class _StarvedSocket:
    """The listening socket as a process out of descriptors sees it: select fails (``select``),
    or it says a connection is pending and accept fails with EMFILE (``accept``)."""

    def __init__(self, real: socket.socket, fails: str) -> None:
        self.real, self.fails, self.calls = real, fails, 0

    def fileno(self) -> int:
        if self.fails == "select":
            self.calls += 1
            raise OSError(errno.EBADF, "Bad file descriptor")
        return self.real.fileno()

    def accept(self) -> tuple[socket.socket, object]:
        self.calls += 1
        raise OSError(errno.EMFILE, "Too many open files")

    def close(self) -> None:
        self.real.close()

    def shutdown(self, how: int) -> None:
        self.real.shutdown(how)


def test_the_accept_loop_waits_out_failures_and_goes_on_serving(start_listener: Callable[..., Listener]) -> None:
    """A select that fails ended the accept thread: the listener looked alive and accepted
    nothing. An accept that fails with EMFILE (the connection stays pending, so select is ready
    again at once) spun a core writing ~10,000 tracebacks a second. Both now wait
    ``ACCEPT_BACKOFF_SECONDS`` and go on."""
    listener = start_listener()
    server = listener._server
    assert server is not None
    real = server.socket
    for fails in ("select", "accept"):
        starved = _StarvedSocket(real, fails)
        server.socket = starved  # type: ignore[assignment]
        pending = socket.create_connection(("127.0.0.1", listener.port)) if fails == "accept" else None
        time.sleep(0.6)  # the loop's select on the real socket returns within its poll interval
        before = starved.calls
        time.sleep(1.0)
        assert 3 <= starved.calls - before <= 20, (fails, starved.calls - before)
        if pending is not None:
            pending.close()
    server.socket = real
    assert echoscu(listener.port).returncode == 0  # the loop is still there


def test_a_staging_file_that_cannot_be_removed_costs_neither_the_answer_nor_the_slot(
        start_listener: Callable[..., Listener], monkeypatch: pytest.MonkeyPatch) -> None:
    """Removing an instance's staging file (EACCES, EIO) raised before the C-STORE answer, so the
    sender saw its association drop after its instance was stored; and in the association's
    cleanup it skipped giving back the association slot and the connection: past
    ``max_associations`` such, the listener refused every sender."""
    listener = start_listener(max_associations=2)
    server = listener._server
    assert server is not None
    real_unlink = Path.unlink
    staging = listener.storage.root

    def unlink(self: Path, missing_ok: bool = False) -> None:
        if self.is_relative_to(staging) and ".incoming" in self.parts:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink)
    for _ in range(3):  # more associations than the limit, one after another
        sent = storescu(listener.port, [CORPUS / "ct" / "pydicom_CT_small.dcm"])
        assert sent.statuses() == ["Success"], sent.output
    deadline = time.monotonic() + 5
    while (server.slots.active, server._connections) != (0, 0):
        assert time.monotonic() < deadline, (server.slots.active, server._connections)
        time.sleep(0.05)


def test_a_receiver_ready_after_the_listener_stopped_waiting_serves_on() -> None:
    """A receiving process says it serves with a byte on its pipe; a listener whose 30 s wait
    for it ran out has closed the pipe's read end. The write's BrokenPipeError ended that
    receiver (and its replacement started over, its journal segment prepared again); now it
    serves on, and the pipe is closed either way."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    _say_ready(write_end)
    with pytest.raises(OSError):
        os.fstat(write_end)


def test_a_storage_without_hard_links_receives_large_instances(engine: Engine, tmp_path: Path) -> None:
    """The storage on exFAT through FUSE (no hard links, as on vfat or some SMB shares): CT
    slices above ``spool_max_bytes`` (placed before their answer) were all refused with 0xA700;
    now they are stored, indexed, and their files hold what was sent. Small ones (journaled,
    written after the answer) too."""
    slices = make_ct_series(tmp_path / "ct", 4)
    small = make_ct_series(tmp_path / "small", 4, rows=64, cols=64)
    with mounted_exfat(tmp_path) as mountpoint:
        listener = Listener(
            settings=ListenerSettings(host="127.0.0.1", port=0, min_free_bytes=0),
            study_settings=StudySettings(stable_after=3600, sweep_interval=3600),
            engine=engine, storage=FileStorage(mountpoint / "storage"))
        port = listener.start()
        try:
            run = storescu(port, [*slices, *small])
            assert run.statuses() == ["Success"] * 8, run.output[-2000:]
        finally:
            listener.stop()
        with session_scope(engine) as s:
            rows = s.exec(select(Instance)).all()
        assert len(rows) == 8
        for row in rows:
            data = (mountpoint / "storage" / row.storage_key).read_bytes()
            assert hashlib.sha256(data).hexdigest() == row.sha256
