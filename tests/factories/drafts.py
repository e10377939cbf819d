"""Drafts built from the real DICOM headers of the corpus (tests/data/dicom).

The text is fixed sample wording in both languages; everything about the patient, study, series
and instances comes from the files' headers, read with pydicom.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pydicom

from reporting.draft import (
    Draft,
    KeyImageRef,
    ModelProvenance,
    PatientRef,
    Sections,
    SeriesRef,
    StudyRef,
)

DICOM = Path(__file__).resolve().parent.parent / "data" / "dicom"

CT_SMALL = DICOM / "ct" / "pydicom_CT_small.dcm"
CT_3SLICE = sorted((DICOM / "ct" / "series_dcmqi_ct3slice").glob("*.dcm"))
ARABIC_NAME = DICOM / "charset" / "pydicom_chrArab.dcm"
MR_SMALL = DICOM / "mr" / "pydicom_MR_small" / "MR_small.dcm"
MAMMO = DICOM / "mg" / "fodicom_GH133_mammo.dcm"

SECTIONS = {
    "en": Sections(
        findings="The lungs are clear. No pleural effusion.\n\nHeart size is within normal limits.",
        impression="No acute cardiopulmonary abnormality.",
    ),
    "ar": Sections(
        findings="الرئتان سليمتان. لا يوجد انصباب جنبي.\n\nحجم القلب ضمن الحدود الطبيعية.",
        impression="لا توجد أي تشوهات قلبية رئوية حادة.",
    ),
}

MODEL = ModelProvenance(
    backend="sglang",
    model_name="BiMediX2-8B",
    model_revision="sha256:" + hashlib.sha256(b"bimedix2-checkpoint").hexdigest(),
    prompt_template_id="radiology-bilingual-v1",
    prompt_template_sha256=hashlib.sha256(b"prompt template v1").hexdigest(),
    sampling={"temperature": 0.0, "max_tokens": 1024},
    prompt_tokens=812,
    completion_tokens=240,
    latency_s=3.2,
)


def _s(ds: pydicom.Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    text = str(value).strip() if value is not None else ""
    return text or None


def _birth_date(value: str | None) -> date | None:
    try:
        return datetime.strptime(value, "%Y%m%d").date() if value else None
    except ValueError:  # e.g. 00000000 in anonymised files
        return None


def _started(ds: pydicom.Dataset) -> datetime | None:
    d, t = _s(ds, "StudyDate"), _s(ds, "StudyTime")
    if not d:
        return None
    t = (t or "000000").split(".")[0].ljust(6, "0")
    return datetime.strptime(d + t[:6], "%Y%m%d%H%M%S")


def draft_from_dicom(
    paths: Sequence[Path],
    *,
    version: int = 1,
    sections: dict[str, Sections] | None = None,
    created_at: datetime | None = None,
    draft_suffix: str = "",
) -> Draft:
    """A draft of the study the files belong to (all files must share one study)."""
    datasets = [pydicom.dcmread(p, stop_before_pixels=True, force=True) for p in paths]
    first = datasets[0]
    birth = _s(first, "PatientBirthDate")
    sex = _s(first, "PatientSex")
    patient = PatientRef(
        patient_id=_s(first, "PatientID") or "UNKNOWN",
        issuer=_s(first, "IssuerOfPatientID"),
        name=_s(first, "PatientName"),
        sex=sex if sex in ("M", "F", "O") else None,  # type: ignore[arg-type]
        birth_date=_birth_date(birth),
        age=_s(first, "PatientAge"),
    )
    series: dict[str, list[pydicom.Dataset]] = {}
    for ds in datasets:
        series.setdefault(str(ds.SeriesInstanceUID), []).append(ds)
    series_refs = tuple(
        SeriesRef(
            series_instance_uid=uid,
            modality=_s(items[0], "Modality"),
            body_part=_s(items[0], "BodyPartExamined"),
            description=_s(items[0], "SeriesDescription"),
            number=int(items[0].SeriesNumber) if _s(items[0], "SeriesNumber") else None,
            instance_count=len(items),
            sop_class_uids=tuple(sorted({str(d.SOPClassUID) for d in items})),
        )
        for uid, items in series.items()
    )
    study_uid = str(first.StudyInstanceUID)
    key_images = tuple(
        KeyImageRef(
            series_instance_uid=str(ds.SeriesInstanceUID),
            sop_instance_uids=(str(ds.SOPInstanceUID),),
            sop_class_uid=str(ds.SOPClassUID),
            label=f"image {i + 1}",
            sha256=hashlib.sha256(str(ds.SOPInstanceUID).encode()).hexdigest(),
        )
        for i, ds in enumerate(datasets[:2])
    )
    study = StudyRef(
        study_instance_uid=study_uid,
        version=version,
        accession_number=_s(first, "AccessionNumber"),
        started=_started(first),
        description=_s(first, "StudyDescription"),
        modalities=tuple(dict.fromkeys(s.modality for s in series_refs if s.modality)),
        patient=patient,
        series=series_refs,
    )
    draft_id = hashlib.sha256(f"{study_uid}|{version}|cfg{draft_suffix}".encode()).hexdigest()[:32]
    return Draft(
        draft_id=draft_id,
        study=study,
        sections=sections or SECTIONS,  # type: ignore[arg-type]
        key_images=key_images,
        model=MODEL,
        created_at=created_at or datetime(2026, 11, 1, 8, 30, tzinfo=UTC),
        pipeline_config_sha256=hashlib.sha256(b"cfg").hexdigest(),
    )


def draft_variant(base: Draft, n: int, *, patients: int = 50) -> Draft:
    """The ``n``-th variant of ``base``: its own study UID, accession and draft id, one of
    ``patients`` patients, and a study date that moves back one day per variant (for date search)."""
    study_uid = f"{base.study.study_instance_uid}.{n}"
    started = (base.study.started or datetime(2024, 1, 1, 9, 0)) - timedelta(days=n)
    patient = base.study.patient.model_copy(update={"patient_id": f"{base.study.patient.patient_id}-{n % patients}"})
    study = base.study.model_copy(update={
        "study_instance_uid": study_uid,
        "accession_number": f"ACC{n:07d}",
        "started": started,
        "patient": patient,
    })
    return base.model_copy(update={
        "draft_id": hashlib.sha256(f"{study_uid}|{study.version}|cfg".encode()).hexdigest()[:32],
        "study": study,
        "created_at": base.created_at + timedelta(minutes=n),
    })


def sample_draft() -> Draft:
    """The CT series of three slices (GE, TCIA via dcmqi), version 1."""
    return draft_from_dicom(CT_3SLICE)
