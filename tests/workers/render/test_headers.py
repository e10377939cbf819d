"""The renderer's input rows: from files (no pixels) and from the index, by one mapping."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from pydicom import dcmread
from sqlalchemy.engine import Engine

from ground.db import session_scope
from integrations.dicom.index import study_by_uid
from integrations.dicom.ingest import ingest_file
from storage import FileStorage
from workers.render import InstanceInput, instance_input, instances_from_files
from workers.render.headers import sort_paths
from workers.service import instance_inputs


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
    # Number of Frames '1A' is no IS: read as absent (one frame), as the index reads it
    assert [(i.path.name, i.number_of_frames) for i in found] == [("pydicom_badVR_rtdose.dcm", 1),
                                                                  ("pydicom_CT_small.dcm", 1)]
    reasons = {p.name: why for p, why in found.skipped}
    assert "DICOMDIR" in reasons["DICOMDIR"]
    assert (
        "unreadable DICOM header"
        in reasons["fodicom_GH177_CT1_IVRLE_BigEndian_undefined_length.dcm"]
    )
    # skipped for what the listener's header extraction refuses them for (0xA900 at the listener)
    assert "SOPClassUID is missing" in reasons["garbage.dcm"]
    assert "unreadable DICOM header" in reasons["missing.dcm"]


def test_sort_paths_walks_folders(corpus: Path) -> None:
    files = sort_paths([corpus / "mr/series_dcm4che_wrist", corpus / "ct/pydicom_CT_small.dcm"])
    assert len(files) == 17 and files == [*sorted(files[:16]), corpus / "ct/pydicom_CT_small.dcm"]


def test_the_pipeline_and_the_files_give_the_renderer_the_same_rows(engine: Engine, tmp_path: Path,
                                                                      corpus: Path) -> None:
    """One mapping: a study ingested by the listener's ingest and read back from the index
    (``workers.service.instance_inputs``, what production renders) gives exactly the rows that
    :func:`instances_from_files` gives for the stored files (what the render tests render)."""
    storage = FileStorage(tmp_path / "storage")
    sources = sorted((corpus / "mr/series_dcm4che_wrist").glob("*.dcm"))[:5]
    for path in sources:
        staged = storage.staging_file(delete=False, suffix=".dcm")
        staged.write(path.read_bytes())
        staged.close()
        ingest_file(engine=engine, storage=storage, staged=Path(staged.name), calling_ae="PACS")
    study_uid = str(dcmread(sources[0], stop_before_pixels=True).StudyInstanceUID)
    with session_scope(engine) as s:
        study = study_by_uid(s, study_uid)
        assert study is not None
        from_index = instance_inputs(SimpleNamespace(storage=storage), s, study)  # type: ignore[arg-type]
    from_files = instances_from_files([i.path for i in from_index])
    assert len(from_index) == 5 and not from_files.skipped
    assert from_index == list(from_files)


def test_the_mapping_normalises_coded_values_once(corpus: Path) -> None:
    """Modality, Body Part Examined and Image Type are compared upper-case by the rules (CS,
    PS3.5 6.2); positions of the wrong length are dropped, frames are at least one."""
    series = SimpleNamespace(series_instance_uid="1.2.3", modality=" mr ", body_part="wrist",
                             description=" T1 ", number=3)
    instance = SimpleNamespace(sop_instance_uid="1.2.3.4", sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
                               image_type="original\\primary\\\\", instance_number=None, number_of_frames=0,
                               rows=8, columns=8, image_position_patient="[1, 2]",
                               image_orientation_patient="[1, 0, 0, 0, 1, 0]")
    got = instance_input(corpus / "x.dcm", series, instance)
    assert (got.modality, got.body_part, got.series_description) == ("MR", "WRIST", "T1")
    assert got.image_type == ("ORIGINAL", "PRIMARY") and got.number_of_frames == 1
    assert got.image_position_patient is None and got.image_orientation_patient == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
