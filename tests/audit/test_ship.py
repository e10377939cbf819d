"""ATNA shipping against a real collector: Debian's rsyslogd with TLS (gtls, mutual X.509) on loopback,
on SQLite and PostgreSQL. The collector is stopped and restarted mid-stream."""

from __future__ import annotations

import logging
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlmodel import Session
from typer.testing import CliRunner

from audit.atna import AtnaSource
from audit.chain import AuditRecord, record, verify
from audit.config import AtnaSettings
from audit.ship import AtnaCursor, AtnaShipper, TlsRejected, read_cursor
from ground.db import session_scope
from tests.conftest import free_port
from tests.factories.rsyslog import Received, Rsyslog
from tests.factories.tls import Pki, make_pki

SOURCE = AtnaSource(source_id="TAQRIR", enterprise_site="Test site", base_url="http://127.0.0.1:8080/fhir",
                    hostname="taqrir-test", app_name="taqrir")


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


@pytest.fixture
def collector(tmp_path: Path, pki: Pki) -> Iterator[Rsyslog]:
    rs = Rsyslog(tmp_path / "rsyslog", free_port(), pki)
    rs.start()
    try:
        yield rs
    finally:
        rs.stop()


def _settings(collector: Rsyslog, pki: Pki, **kw: object) -> AtnaSettings:
    base: dict[str, object] = {
        "enabled": True, "host": "127.0.0.1", "port": collector.port, "server_name": "localhost", "ca_file": pki.ca,
        "cert_file": pki.client_cert, "key_file": pki.client_key, "batch": 20, "poll_s": 0.05, "retry_min_s": 0.05,
        "retry_max_s": 0.4, "settle_s": 0.05, "ack_timeout_s": 5,
    }
    base.update(kw)
    return AtnaSettings.model_validate(base)


def _append(engine: Engine, n: int, start: int = 0) -> None:
    with session_scope(engine) as s:
        for i in range(start, start + n):
            action = ("fhir.read", "fhir.search", "instance.new", "study.queued", "association.refused")[i % 5]
            record(s, action=action, actor=f"user{i % 3}", entity_type="DiagnosticReport", entity_id=f"r{i}",
                   outcome="failure" if action == "association.refused" else "success",
                   details={"version": 1, "study": "1.2.826.0.1.3680043.8.498.1", "params": ["patient"], "total": 1,
                            "address": "127.0.0.1", "reason": "host not allowed"})


def _count(engine: Engine) -> int:
    with Session(engine) as s:
        return int(s.exec(select(func.count()).select_from(AuditRecord)).one()[0])  # type: ignore[call-overload]


def _check_stream(got: list[Received], expected: int, dup_bound: int) -> int:
    """Every seq 1..expected arrived, first copies in chain order, duplicates identical and bounded."""
    first: dict[int, Received] = {}
    order: list[int] = []
    dups = 0
    for r in got:
        if r.seq in first:
            assert r.raw == first[r.seq].raw, f"record {r.seq} arrived twice with different content"
            dups += 1
            continue
        first[r.seq] = r
        order.append(r.seq)
    assert set(first) == set(range(1, expected + 1)), f"missing: {sorted(set(range(1, expected + 1)) - set(first))[:20]}"
    assert order == sorted(order), "records arrived out of chain order"
    assert dups <= dup_bound, f"{dups} duplicates, more than the stated bound {dup_bound}"
    return dups


def test_ships_every_record_once_in_order_as_dicom_audit_xml(engine: Engine, collector: Rsyslog, pki: Pki) -> None:
    _append(engine, 45)
    shipper = AtnaShipper(_settings(collector, pki), engine, SOURCE)
    assert shipper.ship_all() == 45
    assert shipper.ship_all() == 0  # caught up: nothing is sent twice
    got = collector.wait_for(set(range(1, 46)))
    _check_stream(got, 45, dup_bound=0)
    assert len(got) == 45
    assert read_cursor(engine, f"127.0.0.1:{collector.port}") == 45
    with Session(engine) as s:
        hashes = {r.seq: r.hash for r in s.exec(select(AuditRecord)).scalars()}  # type: ignore[call-overload]
    for r in got:
        assert r.hash == hashes[r.seq]
        header, _, body = r.raw.partition(b"] ")
        assert header.startswith((b"<85>1 ", b"<84>1 "))  # facility 10, notice / warning (RFC 5424, ITI-20)
        assert b" taqrir-test taqrir - IHE+RFC-3881 [taqrir@32473 " in header
        msg = ET.fromstring(body)  # the DICOM audit message, well-formed, no BOM
        assert msg.tag == "AuditMessage"
        event_id = msg.find("EventIdentification/EventID")
        assert event_id is not None and event_id.get("codeSystemName") == "DCM"
        assert msg.find("AuditSourceIdentification").get("AuditSourceID") == "TAQRIR"  # type: ignore[union-attr]
    by_code = {ET.fromstring(r.raw.partition(b"] ")[2]).find("EventIdentification/EventID").get("csd-code")  # type: ignore[union-attr]
               for r in got}
    assert by_code == {"110110", "110112", "110107", "110111", "110114"}


def test_collector_stopped_and_restarted_mid_stream_loses_nothing(engine: Engine, collector: Rsyslog, pki: Pki) -> None:
    """Records keep being written while the collector goes away for a while and comes back: every
    record arrives, in order; re-sends are bounded by one batch and identical (same seq/hash key)."""
    _append(engine, 150)
    settings = _settings(collector, pki)
    shipper = AtnaShipper(settings, engine, SOURCE)
    shipper.start()
    stop_writing = threading.Event()

    def writer() -> None:
        i = 150
        while not stop_writing.is_set():
            _append(engine, 1, start=i)
            i += 1
            time.sleep(0.01)

    w = threading.Thread(target=writer)
    w.start()
    try:
        deadline = time.monotonic() + 30
        while len(collector.received()) < 60 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(collector.received()) >= 60, "nothing arrived before the collector was stopped"
        collector.stop()  # mid-stream: batches are in flight, records are still being written
        time.sleep(1.5)
        with session_scope(engine) as s:
            row = s.get(AtnaCursor, settings.collector)
            assert row is not None and row.failures >= 1 and row.last_error  # the outage is visible
        collector.start()
        time.sleep(1.0)
    finally:
        stop_writing.set()
        w.join()
    expected = _count(engine)
    got = collector.wait_for(set(range(1, expected + 1)), timeout=60)
    shipper.stop()
    collector.stop()
    got = collector.received()
    dups = _check_stream(got, expected, dup_bound=settings.batch)
    print(f"mid-stream restart: {expected} records, {dups} re-sent")
    assert read_cursor(engine, settings.collector) == expected
    with Session(engine) as s:
        assert verify(s).ok


def test_untrusted_collector_certificate_is_a_recorded_permanent_failure(engine: Engine, collector: Rsyslog,
                                                                          pki: Pki) -> None:
    _append(engine, 5)
    settings = _settings(collector, pki, ca_file=pki.other_ca)
    shipper = AtnaShipper(settings, engine, SOURCE)
    with pytest.raises(TlsRejected, match="certificate does not verify"):
        shipper.ship_batch()
    shipper.start()  # keeps retrying with capped backoff, recording the failure once
    time.sleep(1.5)
    shipper.stop()
    with session_scope(engine) as s:
        row = s.get(AtnaCursor, settings.collector)
        assert row is not None and row.last_seq == 0 and row.failures >= 3
        assert "certificate does not verify" in row.last_error
        alerts = s.exec(select(AuditRecord).where(AuditRecord.action == "atna.tls_failure")).scalars().all()  # type: ignore[call-overload]
    assert len(alerts) == 1 and alerts[0].outcome == "failure"
    assert collector.received() == []


def test_client_certificate_the_collector_does_not_trust_is_refused(engine: Engine, collector: Rsyslog,
                                                                     pki: Pki) -> None:
    _append(engine, 3)
    settings = _settings(collector, pki, cert_file=pki.rogue_client_cert, key_file=pki.rogue_client_key)
    with pytest.raises(TlsRejected, match="does not accept this client"):
        AtnaShipper(settings, engine, SOURCE).ship_all()
    assert read_cursor(engine, settings.collector) == 0
    assert collector.received() == []


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """The CLI configures the root logger (a handler on the runner's stream): put it back after."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("restore_logging")
def test_collector_down_then_up_with_audit_ship_once(engine: Engine, db_url: str, tmp_path: Path, pki: Pki) -> None:
    """``taqrir audit-ship --once``: fails (exit 1) while the collector is down, then sends everything."""
    from taqrir.cli import app

    rs = Rsyslog(tmp_path / "rs-cli", free_port(), pki)
    _append(engine, 12)
    env = {"TAQRIR_DATABASE_URL": db_url, "TAQRIR_DATA_DIR": str(tmp_path / "data"),
           "TAQRIR_ATNA__HOST": "127.0.0.1", "TAQRIR_ATNA__PORT": str(rs.port),
           "TAQRIR_ATNA__SERVER_NAME": "localhost", "TAQRIR_ATNA__CA_FILE": str(pki.ca),
           "TAQRIR_ATNA__CERT_FILE": str(pki.client_cert), "TAQRIR_ATNA__KEY_FILE": str(pki.client_key),
           "TAQRIR_ATNA__CONNECT_TIMEOUT_S": "2"}
    runner = CliRunner()
    down = runner.invoke(app, ["audit-ship", "--once"], env=env)
    assert down.exit_code == 1, down.output
    assert "transient" in down.output
    rs.start()
    try:
        up = runner.invoke(app, ["audit-ship", "--once"], env=env)
        assert up.exit_code == 0, up.output
        assert "sent 12 audit records" in up.output
        got = rs.wait_for(set(range(1, 13)))
    finally:
        rs.stop()
    _check_stream(got, 12, dup_bound=0)
    assert len(got) == 12


def test_backoff_doubles_and_is_capped(engine: Engine) -> None:
    settings = AtnaSettings(enabled=True, host="127.0.0.1", retry_min_s=1, retry_max_s=30)
    shipper = AtnaShipper(settings, engine, SOURCE)
    waits = [shipper.backoff(n) for n in range(1, 12)]
    assert 0.8 <= waits[0] <= 1.0 and 1.6 <= waits[1] <= 2.0
    assert all(w <= 30 for w in waits) and waits[-1] >= 24


def test_listen_and_serve_start_the_background_sender(engine: Engine, db_url: str, tmp_path: Path,
                                                      collector: Rsyslog, pki: Pki) -> None:
    """What ``taqrir listen``/``serve`` do with ``atna.enabled``: a sender thread that keeps up."""
    from taqrir.settings import load_settings
    from taqrir.wiring import atna_sender

    settings = load_settings(data_dir=tmp_path / "data", database_url=db_url, atna={
        "enabled": True, "host": "127.0.0.1", "port": collector.port, "server_name": "localhost", "ca_file": pki.ca,
        "cert_file": pki.client_cert, "key_file": pki.client_key, "poll_s": 0.05})
    assert atna_sender(load_settings(data_dir=tmp_path / "data", database_url=db_url), engine) is None  # off by default
    shipper = atna_sender(settings, engine)
    assert shipper is not None
    shipper.start()
    try:
        _append(engine, 4)
        got = collector.wait_for({1, 2, 3, 4}, timeout=20)
        _append(engine, 3, start=4)
        got = collector.wait_for(set(range(1, 8)), timeout=20)
    finally:
        shipper.stop()
    _check_stream(got, 7, dup_bound=0)
