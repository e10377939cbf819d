"""Header reading into InstanceInput rows (no pixels)."""

from __future__ import annotations

from pathlib import Path

from workers.render import InstanceInput, instances_from_files
from workers.render.headers import sort_paths


def test_fields_of_a_ct_slice(corpus: Path) -> None:
    [inst] = instances_from_files([corpus / "ct/series_dcmqi_ct3slice/01.dcm"])
    assert isinstance(inst, InstanceInput)
    assert (
        inst.modality == "CT"
        and inst.number_of_frames == 1
        and (inst.rows, inst.columns) == (512, 512)
    )
    assert inst.image_type[:2] == ("ORIGINAL", "PRIMARY")
    assert inst.image_position_patient is not None and len(inst.image_position_patient) == 3
    assert inst.image_orientation_patient is not None and len(inst.image_orientation_patient) == 6
    assert inst.sop_class_uid == "1.2.840.10008.5.1.4.1.1.2" and inst.is_image


def test_multiframe_and_non_image_objects(corpus: Path) -> None:
    [us] = instances_from_files([corpus / "us/fodicom_DIRW0007_echo_cine.dcm"])
    assert us.number_of_frames == 65 and us.image_position_patient is None
    [sr] = instances_from_files([corpus / "other/pydicom_test-SR.dcm"])
    assert sr.modality == "SR" and not sr.is_image and sr.rows is None


def test_file_without_file_meta_is_read(corpus: Path) -> None:
    [cr] = instances_from_files([corpus / "cr_dx/fodicom_CR-MONO1-10-chest.dcm"])
    assert cr.modality == "CR" and cr.sop_class_uid


def test_unusable_files_are_skipped_with_a_reason(corpus: Path, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"not dicom at all" * 10)
    paths = [
        corpus / "other/dicomdir_pcir/DICOMDIR",
        corpus / "malformed/fodicom_GH177_CT1_IVRLE_BigEndian_undefined_length.dcm",
        corpus / "malformed/pydicom_badVR_rtdose.dcm",
        garbage,
        tmp_path / "missing.dcm",
        corpus / "ct/pydicom_CT_small.dcm",
    ]
    found = instances_from_files(paths)
    assert [i.path.name for i in found] == ["pydicom_CT_small.dcm"]
    reasons = {p.name: why for p, why in found.skipped}
    assert "DICOMDIR" in reasons["DICOMDIR"]
    assert (
        "unreadable DICOM header"
        in reasons["fodicom_GH177_CT1_IVRLE_BigEndian_undefined_length.dcm"]
    )
    assert "invalid Number of Frames" in reasons["pydicom_badVR_rtdose.dcm"]
    assert "not a composite instance" in reasons["garbage.dcm"]
    assert "unreadable DICOM header" in reasons["missing.dcm"]


def test_sort_paths_walks_folders(corpus: Path) -> None:
    files = sort_paths([corpus / "mr/series_dcm4che_wrist", corpus / "ct/pydicom_CT_small.dcm"])
    assert len(files) == 17 and files == sorted(files[:16]) + [corpus / "ct/pydicom_CT_small.dcm"]
