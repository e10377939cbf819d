"""A verified SR from the reporting system, received by the listener, read as the signed report.

Many reporting systems send the radiologist's signed report to the PACS (and so, by auto-route,
to Taqrir) as a DICOM SR: Basic Text, Enhanced or Comprehensive SR with a TID 2000-style tree
(root 18748-4 "Diagnostic Imaging Report", containers 121070 Findings / 121072 Impressions,
TEXT items). PS3.3 C.17.2 (SR Document General Module): VerificationFlag ``VERIFIED`` means a
Verifying Observer attested the content, CompletionFlag ``COMPLETE`` that it is finished; only
such an SR is a signed report (Taqrir's own drafts are ``UNVERIFIED``/``PARTIAL`` and are never
read back as signed).

:func:`signed_from_sr` is pure (dataset in, :class:`audit.signed.SignedReportIn` out). The
language of each TEXT item is the code of the nearest "Language of Content Item and Descendants"
(121049, PS3.16 TID 1204) on it or an ancestor (``ar``, ``en``, ``ar-SA`` ...), else its script.
An SR with Predecessor Documents Sequence revises an earlier one: stored as ``amended``.

:class:`SignedSrReader` is the listener's post-store hook: the C-STORE handler only queues SR
instances (after they are durably indexed, before Success is answered: a queue put), and one
background thread per process reads and stores them; :meth:`SignedSrReader.recover` queues SRs
left unread by a crash. A report object does not start a new study version
(:func:`integrations.dicom.lifecycle.on_instance`), so a signed SR never makes Taqrir draft the
study again.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from sqlalchemy.engine import Engine
from sqlmodel import col, select

from audit.chain import record
from audit.deltas import script_language
from audit.signed import (
    SignedReportError,
    SignedReportIn,
    SignedText,
    store_signed_report,
)
from audit.signed_report import SignedReport
from ground.db import session_scope
from storage import Storage

from .index import Instance
from .ingest import IngestResult

log = logging.getLogger(__name__)

SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
KOS = "1.2.840.10008.5.1.4.1.1.88.59"
LANGUAGE_CONCEPT = "121049"
FINDINGS = frozenset({"121070", "121071", "59776-5"})
IMPRESSIONS = frozenset({"121072", "121073", "19005-8"})


class NotSigned(ValueError):
    """The SR is not a signed report (not VERIFIED and COMPLETE, or no text)."""


def is_text_sr(sop_class_uid: str) -> bool:
    """An SR storage class that can carry a narrative report (KOS cannot)."""
    return sop_class_uid.startswith(SR_PREFIX) and sop_class_uid != KOS


def _code(item: Dataset, keyword: str) -> str:
    seq = item.get(keyword)
    return str(seq[0].CodeValue) if seq and "CodeValue" in seq[0] else ""


def _language(item: Dataset) -> str | None:
    """The language an item sets for itself and its descendants (121049 HAS CONCEPT MOD)."""
    for child in item.get("ContentSequence", []):
        if (child.get("ValueType") == "CODE" and _code(child, "ConceptNameCodeSequence") == LANGUAGE_CONCEPT):
            code = _code(child, "ConceptCodeSequence").split("-")[0].lower()
            return code or None
    return None


def _texts(item: Dataset, lang: str | None, section: str) -> Iterator[tuple[str | None, str, str]]:
    """(language, section, text) of every TEXT item under ``item``, in document order."""
    for child in item.get("ContentSequence", []):
        concept = _code(child, "ConceptNameCodeSequence")
        here_lang = _language(child) or lang
        here = "impression" if concept in IMPRESSIONS else "findings" if concept in FINDINGS else section
        vt = child.get("ValueType")
        if vt == "TEXT" and child.get("TextValue"):
            yield here_lang, here, str(child.TextValue)
        elif vt == "CONTAINER":
            yield from _texts(child, here_lang, here)


def _dt(value: str) -> datetime | None:
    """A DICOM DT (YYYYMMDDHHMMSS.FFFFFF&ZZXX) as an aware datetime (UTC without an offset)."""
    v = value.strip()
    if not v:
        return None
    tz: Any = UTC
    for sign in ("+", "-"):
        if sign in v[8:]:
            base, off = v[:8] + v[8:].split(sign)[0], v[8:].split(sign)[1]
            if len(off) == 4 and off.isdigit():
                delta = timedelta(hours=int(off[:2]), minutes=int(off[2:]))
                tz = timezone(delta if sign == "+" else -delta)
            v = base
    v = v.split(".")[0].ljust(14, "0")
    try:
        return datetime.strptime(v[:14], "%Y%m%d%H%M%S").replace(tzinfo=tz)
    except ValueError:
        return None


def signed_from_sr(ds: Dataset, *, actor: str = "", raw_ref: str | None = None) -> SignedReportIn:
    """The signed report a verified, complete SR carries; :class:`NotSigned` otherwise."""
    verification = str(ds.get("VerificationFlag", "")).upper()
    completion = str(ds.get("CompletionFlag", "")).upper()
    if verification != "VERIFIED" or completion != "COMPLETE":
        raise NotSigned(f"SR is {verification or 'without VerificationFlag'}/{completion or 'without CompletionFlag'}:"
                        " only a VERIFIED and COMPLETE SR is a signed report")
    root_lang = _language(ds)
    pieces: dict[str, dict[str, list[str]]] = {}
    for lang, section, text in _texts(ds, root_lang, "findings"):
        language = lang if lang in ("en", "ar") else script_language(text)
        if language not in ("en", "ar") or not text.strip():
            continue
        pieces.setdefault(language, {"findings": [], "impression": []})[section].append(text.strip())
    if not pieces:
        raise NotSigned("the verified SR has no English or Arabic TEXT content item")
    observer = ds.get("VerifyingObserverSequence")
    signer_name = signer_id = None
    signed_at = None
    if observer:
        obs = observer[-1]  # the last verifier signed last (PS3.3 C.17.2.1)
        signer_name = str(obs.get("VerifyingObserverName", "")).replace("^", " ").strip() or None
        signer_id = _code(obs, "VerifyingObserverIdentificationCodeSequence") or None
        signed_at = _dt(str(obs.get("VerificationDateTime", "")))
    texts = tuple(
        SignedText(language=lang, findings="\n".join(p["findings"]),  # type: ignore[arg-type]
                   impression="\n".join(p["impression"]))
        for lang, p in sorted(pieces.items())
    )
    return SignedReportIn(
        source="dicom", source_id=str(ds.SOPInstanceUID),
        status="amended" if ds.get("PredecessorDocumentsSequence") else "final",
        study_instance_uid=str(ds.StudyInstanceUID), accession_number=str(ds.get("AccessionNumber", "")) or None,
        texts=texts, signer_name=signer_name, signer_id=signer_id, signed_at=signed_at, raw_ref=raw_ref,
        actor=actor)


class SignedSrReader:
    """The listener's post-store hook (see the module docstring)."""

    def __init__(self, engine: Engine, storage: Storage) -> None:
        self.engine = engine
        self.storage = storage
        self._queue: queue.Queue[tuple[str, str, str] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def __call__(self, result: IngestResult, calling_ae: str) -> None:
        """Queue a stored SR instance (everything else is ignored)."""
        if is_text_sr(result.headers.sop_class_uid):
            self.submit(result.headers.sop_instance_uid, result.stored.key, calling_ae)

    def submit(self, sop_instance_uid: str, storage_key: str, calling_ae: str) -> None:
        self._ensure_thread()
        self._queue.put((sop_instance_uid, storage_key, calling_ae))

    def _ensure_thread(self) -> None:
        # started on first use, in whichever (possibly pre-forked) process receives the SR
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="signed-sr-reader", daemon=True)
                self._thread.start()

    def join(self, timeout: float = 30.0) -> None:
        """Wait until everything queued so far was read (tests, shutdown)."""
        done = threading.Event()
        self._ensure_thread()
        self._queue.put(None)

        def _wait() -> None:
            self._queue.join()
            done.set()

        threading.Thread(target=_wait, daemon=True).start()
        done.wait(timeout)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is not None:
                    self.read(*item)
            except Exception:
                log.exception("reading a received SR failed")
            finally:
                self._queue.task_done()

    def read(self, sop_instance_uid: str, storage_key: str, calling_ae: str) -> bool:
        """Read one stored SR; store it as the signed report when it is one. True when stored."""
        ds = pydicom.dcmread(self.storage.path(storage_key), stop_before_pixels=True, force=True)
        try:
            signed = signed_from_sr(ds, actor=calling_ae, raw_ref=storage_key)
        except NotSigned as err:
            log.info("SR %s is not a signed report: %s", sop_instance_uid, err)
            return False
        try:
            with session_scope(self.engine) as s:
                res = store_signed_report(s, signed)
        except (SignedReportError, ValueError) as err:
            log.warning("verified SR %s could not be stored as a signed report: %s", sop_instance_uid, err)
            with session_scope(self.engine) as s:
                record(s, action="dicom.sr.refused", actor=calling_ae, entity_type="Instance",
                       entity_id=sop_instance_uid, outcome="failure",
                       details={"error": type(err).__name__, "reason": str(err)[:500]})
            return False
        log.info("verified SR %s stored as signed report %s (%d deltas)", sop_instance_uid, res.signed_ids, res.deltas)
        return True

    def recover(self) -> int:
        """Queue every stored text SR that is not yet a signed report (after a crash or restart);
        returns how many were queued. Unverified SRs are read again each time (headers only)."""
        with session_scope(self.engine) as s:
            done = select(SignedReport.source_id).where(SignedReport.source == "dicom")
            rows = s.exec(
                select(Instance.sop_instance_uid, Instance.storage_key, Instance.calling_ae)
                .where(col(Instance.sop_class_uid).startswith(SR_PREFIX), col(Instance.sop_class_uid) != KOS,
                       col(Instance.sop_instance_uid).not_in(done))
            ).all()
        for uid, key, ae in rows:
            self.submit(uid, key, ae)
        return len(rows)
