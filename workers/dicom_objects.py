"""A draft's DICOM objects on disk: read what the builders need, build, write, hand to the outbox.

The builders (:mod:`reporting.dicom`) are pure; this module is their adapter. It reads the
source study's patient/study attributes from one stored instance's header and the key-image
PNGs the model saw, builds the draft SR, the report PDF (and its Encapsulated PDF) and the KOS,
and writes them twice, each file atomically:

* beside the draft's FHIR JSON in the export folder (``sr.dcm``, ``report.pdf``,
  ``report.pdf.dcm``, ``kos.dcm``), for people;
* in storage under ``exports/<study>/<draft id>/`` (``sr.dcm``, ``pdf.dcm``, ``kos.dcm``), durable
  (:meth:`storage.Storage.put`: fsynced, renamed, directory fsynced), where the sender (the export
  outbox) reads them.

Everything is deterministic (UIDs and bytes derive from the draft), so a publish that crashed
half-way and runs again rewrites the same files; the caller marks the draft published only
after this returned (``workers.service.publish_stage``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from sqlmodel import Session, col, select

from integrations.dicom.index import Instance, Study
from reporting.dicom import (
    Equipment,
    SourceAttributes,
    Verification,
    build_draft_objects,
    build_verified_sr,
    part10,
)
from reporting.draft import Draft
from reporting.fhir import Review
from storage import Storage, key_component, open_storage, write_atomic
from workers.config import ObjectSettings
from workers.exports import WrittenObject, enqueue_export, export_dir
from workers.state import KeyImageSet

log = logging.getLogger(__name__)


def equipment(settings: ObjectSettings) -> Equipment:
    """Taqrir as the writing equipment, with this installation's version and institution."""
    try:
        version = metadata.version("taqrir")
    except metadata.PackageNotFoundError:
        version = "0"
    return Equipment(software_version=version, institution_name=settings.dicom_objects.institution_name)


@dataclass(frozen=True)
class ObjectInputs:
    """Where the builders' inputs are on disk, looked up in the database (no file read yet), so
    that the files are read outside the caller's transaction."""

    source_paths: tuple[Path, ...]
    """A few stored instances of the study (the first readable header is used)."""
    key_images: tuple[tuple[str, Path], ...]
    """``(SHA-256, path)`` of each key-image PNG the model saw."""


def locate_inputs(storage: Storage, session: Session, draft: Draft) -> ObjectInputs:
    """The stored instance files and key-image PNGs of ``draft``'s study version (database only)."""
    study = session.exec(select(Study).where(Study.study_instance_uid == draft.study.study_instance_uid)).first()
    if study is None:
        return ObjectInputs((), ())
    keys = session.exec(select(Instance.storage_key).where(Instance.study_pk == study.id)
                        .order_by(col(Instance.id)).limit(3)).all()
    kis = session.exec(select(KeyImageSet).where(KeyImageSet.study_pk == study.id,
                                                 KeyImageSet.version == draft.study.version,
                                                 KeyImageSet.config_sha256 == draft.pipeline_config_sha256)).first()
    wanted = {k.sha256 for k in draft.key_images}
    images: list[tuple[str, Path]] = []
    if kis is not None:
        folder = storage.path(kis.folder_key)
        images = [(ki["sha256"], folder / ki["file"]) for ki in json.loads(kis.manifest).get("key_images", [])
                  if ki.get("sha256") in wanted]
    return ObjectInputs(tuple(storage.path(k) for k in keys), tuple(images))


def load_source(inputs: ObjectInputs, draft: Draft) -> SourceAttributes:
    """The patient/study attributes of the draft's study, from the header of one of its stored
    instances (decoded from its character set). Falls back to the index's copy when no instance
    file can be read (logged): the objects then carry what the index kept."""
    for path in inputs.source_paths:
        try:
            return SourceAttributes.from_dataset(pydicom.dcmread(path, stop_before_pixels=True))
        except (OSError, InvalidDicomError, ValueError) as err:
            log.warning("source header of study %s unreadable (%s); trying another instance",
                        draft.study.study_instance_uid, type(err).__name__)
    log.warning("no readable instance of study %s: objects carry the index's patient/study attributes",
                draft.study.study_instance_uid)
    return SourceAttributes.from_study_ref(draft.study)


def load_key_images(inputs: ObjectInputs) -> dict[str, bytes]:
    """The key-image PNGs by SHA-256. A PNG that is missing or whose bytes no longer match its
    SHA-256 is left out (the PDF then says "image not available")."""
    out: dict[str, bytes] = {}
    for sha256, path in inputs.key_images:
        try:
            data = path.read_bytes()
        except OSError:
            continue
        if hashlib.sha256(data).hexdigest() == sha256:
            out[sha256] = data
    return out


def read_source(storage: Storage, session: Session, draft: Draft) -> SourceAttributes:
    """:func:`locate_inputs` + :func:`load_source` in one call."""
    return load_source(locate_inputs(storage, session, draft), draft)


def storage_folder(draft: Draft) -> str:
    """Storage folder of a draft's DICOM objects."""
    return f"exports/{key_component(draft.study.study_instance_uid)}/{key_component(draft.draft_id)}"


@dataclass(frozen=True)
class WrittenObjects:
    """What publishing wrote of a draft's DICOM objects, and what it could not make, with why."""

    written: list[WrittenObject]
    skipped: dict[str, str]


_warned_no_pdf = False


def write_draft_objects(settings: ObjectSettings, storage: Storage, draft: Draft, inputs: ObjectInputs,
                        out: Path) -> WrittenObjects:
    """Read the inputs, build the draft's SR, PDF and KOS and write them (export folder and storage)."""
    global _warned_no_pdf  # one warning per process; each draft's audit record says it too
    source, pngs = load_source(inputs, draft), load_key_images(inputs)
    objects = build_draft_objects(draft, source, equipment(settings), pngs)
    folder = storage_folder(draft)
    written: list[WrittenObject] = []
    skipped: dict[str, str] = {}
    items = [("sr", objects.sr, "sr.dcm", "sr.dcm")]
    if objects.pdf is not None and objects.pdf_document is not None:
        items.append(("pdf", objects.pdf_document, "report.pdf.dcm", "pdf.dcm"))
        write_atomic(out / "report.pdf", objects.pdf)
    else:
        skipped["pdf"] = objects.pdf_skipped or "no PDF was made"
        if not _warned_no_pdf:
            log.warning("%s", skipped["pdf"])
            _warned_no_pdf = True
    if objects.kos is not None:
        items.append(("kos", objects.kos, "kos.dcm", "kos.dcm"))
    else:
        log.info("draft %s has no key images: no KOS", draft.draft_id)
    for kind, ds, export_name, storage_name in items:
        data = part10(ds)
        key = f"{folder}/{storage_name}"
        storage.put(key, data)
        write_atomic(out / export_name, data)
        written.append(WrittenObject(kind=kind, sop_class_uid=str(ds.SOPClassUID),
                                     sop_instance_uid=str(ds.SOPInstanceUID), storage_key=key,
                                     export_file=out / export_name))
    return WrittenObjects(written, skipped)


def verification_from_review(settings: ObjectSettings, draft: Draft, review: Review, *, report_version: int) -> Verification:
    """The verified SR's input from a FHIR ``$review`` (accept or edit)."""
    return Verification(
        action=review.action,
        reviewer_name=review.reviewer_display or review.reviewer_id,
        reviewer_id=review.reviewer_id,
        organization=settings.dicom_objects.organization(),
        verified_at=review.reviewed_at,
        sections=review.sections(draft),
        revision=f"report-v{report_version}",
    )


def store_verified_sr(session: Session, settings: ObjectSettings, draft: Draft, review: Review, *,
                      report_version: int) -> WrittenObject | None:
    """After a clinician accepted or edited ``draft`` through ``$review``: build the verified SR,
    write it (export folder ``verified-sr-v<N>.dcm`` and storage) and queue it for export in the
    caller's transaction. A rejection makes none (returns ``None``)."""
    if review.action == "reject" or not settings.dicom_objects.enabled:
        return None
    storage = open_storage(settings.storage_url)
    source = read_source(storage, session, draft)
    ds = build_verified_sr(draft, source, equipment(settings),
                           verification_from_review(settings, draft, review, report_version=report_version))
    data = part10(ds)
    key = f"{storage_folder(draft)}/verified-sr-v{report_version}.dcm"
    storage.put(key, data)
    out = export_dir(settings, draft) / f"verified-sr-v{report_version}.dcm"
    write_atomic(out, data)
    obj = WrittenObject(kind="verified_sr", sop_class_uid=str(ds.SOPClassUID), sop_instance_uid=str(ds.SOPInstanceUID),
                        storage_key=key, export_file=out)
    enqueue_export(session, settings, draft, [obj])
    return obj
