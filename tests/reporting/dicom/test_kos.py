"""The Key Object Selection of the key images: TID 2010, dciodvfy, read back, no key images."""

from __future__ import annotations

from pathlib import Path

import pytest

from reporting.dicom import (
    Equipment,
    NoKeyImages,
    SourceAttributes,
    UnknownSopClass,
    build_kos,
    object_uids,
)
from reporting.draft import KeyImageRef
from tests.factories.drafts import DICOM, draft_from_dicom, sample_draft
from tests.reporting.dicom.checks import dciodvfy_errors, write_and_read

US_CINE = DICOM / "us" / "fodicom_DIRW0007_echo_cine.dcm"
EQUIPMENT = Equipment(software_version="0.1.0", institution_name="Research Hospital")


def test_kos_lists_the_key_images(tmp_path: Path) -> None:
    draft = sample_draft()
    ds = write_and_read(build_kos(draft, SourceAttributes.from_study_ref(draft.study), EQUIPMENT), tmp_path / "kos.dcm")
    assert dciodvfy_errors(tmp_path / "kos.dcm") == []
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.59"
    assert ds.Modality == "KO" and "research only" in ds.SeriesDescription.lower()
    title = ds.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning) == ("113000", "DCM", "Of Interest")
    assert ds.ContentTemplateSequence[0].TemplateIdentifier == "2010"
    images = [i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in ds.ContentSequence if i.ValueType == "IMAGE"]
    assert images == [k.sop_instance_uids[0] for k in draft.key_images]
    evidence = {r.ReferencedSOPInstanceUID for st in ds.CurrentRequestedProcedureEvidenceSequence
                for s in st.ReferencedSeriesSequence for r in s.ReferencedSOPSequence}
    assert evidence == set(images)
    assert ds.StudyInstanceUID == draft.study.study_instance_uid
    assert ds.SOPInstanceUID == object_uids(draft, "kos").sop_instance_uid
    assert ds.InstitutionName == "Research Hospital"
    assert ds.ContributingEquipmentSequence[0].PurposeOfReferenceCodeSequence[0].CodeValue == "Newcode1"


def test_kos_is_deterministic(tmp_path: Path) -> None:
    draft = sample_draft()
    source = SourceAttributes.from_study_ref(draft.study)
    build_kos(draft, source, EQUIPMENT).save_as(tmp_path / "a.dcm", enforce_file_format=True)
    build_kos(draft, source, EQUIPMENT).save_as(tmp_path / "b.dcm", enforce_file_format=True)
    assert (tmp_path / "a.dcm").read_bytes() == (tmp_path / "b.dcm").read_bytes()


def test_multiframe_key_image_keeps_its_frames(tmp_path: Path) -> None:
    """A US cine (multi-frame): the key frames are referenced; a single-frame image's (1,) is not."""
    draft = draft_from_dicom([US_CINE])
    key = draft.key_images[0].model_copy(update={"frames": (3, 7)})
    ds = write_and_read(build_kos(draft.model_copy(update={"key_images": (key,)}),
                                  SourceAttributes.from_study_ref(draft.study), EQUIPMENT), tmp_path / "kos.dcm")
    assert dciodvfy_errors(tmp_path / "kos.dcm") == []
    image = next(i for i in ds.ContentSequence if i.ValueType == "IMAGE")
    assert list(image.ReferencedSOPSequence[0].ReferencedFrameNumber) == [3, 7]
    single = sample_draft()
    keys = tuple(k.model_copy(update={"frames": (1,)}) for k in single.key_images)
    ds = write_and_read(build_kos(single.model_copy(update={"key_images": keys}),
                                  SourceAttributes.from_study_ref(single.study), EQUIPMENT), tmp_path / "kos1.dcm")
    assert dciodvfy_errors(tmp_path / "kos1.dcm") == []


def test_no_key_images_is_a_clear_error() -> None:
    draft = sample_draft().model_copy(update={"key_images": ()})
    with pytest.raises(NoKeyImages, match="has no key images"):
        build_kos(draft, SourceAttributes.from_study_ref(draft.study), EQUIPMENT)


def test_key_image_without_sop_class_takes_its_series_class() -> None:
    draft = sample_draft()
    keys = tuple(k.model_copy(update={"sop_class_uid": None}) for k in draft.key_images)
    ds = build_kos(draft.model_copy(update={"key_images": keys}), SourceAttributes.from_study_ref(draft.study), EQUIPMENT)
    classes = {i.ReferencedSOPSequence[0].ReferencedSOPClassUID for i in ds.ContentSequence if i.ValueType == "IMAGE"}
    assert classes == {"1.2.840.10008.5.1.4.1.1.2"}
    stray = KeyImageRef(series_instance_uid="1.2.3", sop_instance_uids=("1.2.3.4",), sha256="0" * 64, label="x")
    with pytest.raises(UnknownSopClass, match="has no SOP Class UID"):
        build_kos(draft.model_copy(update={"key_images": (stray,)}), SourceAttributes.from_study_ref(draft.study),
                  EQUIPMENT)
