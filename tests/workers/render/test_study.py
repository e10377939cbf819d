"""render_study over the whole corpus and over mixed studies."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest

from ground.errors import PermanentError
from tests.conftest import DICOM_DIR
from workers.render import NothingRenderable, instances_from_files, render_study
from workers.render.headers import sort_paths
from workers.render_config import RenderSettings

from .conftest import png_array

ALL_FILES = [p.relative_to(DICOM_DIR).as_posix() for p in sort_paths([DICOM_DIR])]

#: Files that do not render alone, with the reason each must give. A new failure fails the test.
NOT_RENDERABLE: dict[str, str] = {
    # headers the listener would not index (refused with 0xA900 or 0xC210 there: see
    # tests/integrations/dicom/test_listener.py), so never rendered in production either
    "charset/pydicom_chrSQEncoding.dcm": "SOPClassUID is missing from the data set",
    "charset/pydicom_chrSQEncoding1.dcm": "SOPClassUID is missing from the data set",
    "other/dicomdir_pcir/DICOMDIR": "DICOMDIR (Media Storage Directory)",
    "other/pydicom-data_HTJ2KLossless_08_RGB.dcm": "StudyInstanceUID is missing from the data set",
    "malformed/dcm4che_no_preamble_dicm_in_data": "SOPClassUID is missing from the data set",
    "malformed/pydicom_UN_sequence.dcm": "SOPClassUID is missing from the data set",
    "malformed/pydicom_meta_missing_tsyntax.dcm": "SOPClassUID is missing from the data set",
    "malformed/pydicom_no_meta_CT.dcm": "SOPClassUID is missing from the data set",
    "malformed/fodicom_GH177_CT1_IVRLE_BigEndian_undefined_length.dcm": "unreadable DICOM header (OSError",
    "malformed/pydicom-data_bad_sequence_CT.dcm": "is not a valid UID (PS3.5 9.1)",
    "charset/pydicom_chrJapMulti.dcm": "no Pixel Data element",
    "charset/pydicom_chrJapMultiExplicitIR6.dcm": "no Pixel Data element",
    # image headers whose pixels cannot be decoded
    "malformed/dcm4che_will-jxl.dcm": "unsupported transfer syntax 1.2.840.10008.1.2.4.111",
    "malformed/pydicom_JPEG-lossy_NM1.dcm": "cannot decode pixel data",
    "malformed/pydicom_JPEG2000-embedded-sequence-delimiter.dcm": "cannot decode pixel data",
    "malformed/pydicom_MR_truncated.dcm": "cannot decode pixel data",
    "malformed/wg04_MR1_JPLY.dcm": "cannot decode pixel data",
    # skipped by the default selection rules
    "malformed/pydicom-data_liver_deflate_SEG.dcm": "rule 'segmentations'",
    "other/pydicom-data_liver_SEG.dcm": "rule 'segmentations'",
    "malformed/pydicom_ExplVR_BigEndNoMeta.dcm": "rule 'rt-objects'",
    "malformed/pydicom_ExplVR_LitEndNoMeta.dcm": "rule 'rt-objects'",
    "malformed/pydicom_badVR_rtdose.dcm": "rule 'rt-objects'",  # Number of Frames '1A': read as absent
    "other/dcm4che_report_dfl_SR.dcm": "rule 'structured-reports'",
    "other/highdicom_sr_document.dcm": "rule 'structured-reports'",
    "other/pydicom_test-SR.dcm": "rule 'structured-reports'",
    "other/pydicom_waveform_ecg.dcm": "rule 'no-pixels'",
    "other/dicomdir_pcir/98892001/CT2N/6293": "rule 'localizers'",
    "other/dicomdir_pcir/98892001/CT2N/6924": "rule 'localizers'",
    "other/dicomdir_pcir/98892003/MR1/15820": "rule 'localizers'",
    "other/dicomdir_pcir/98892003/MR1/4919": "rule 'localizers'",
    "other/dicomdir_pcir/98892003/MR1/5641": "rule 'localizers'",
    "other/dicomdir_pcir/98892003/MR2/15970": "rule 'localizers'",
}


def test_corpus_is_complete() -> None:
    assert len(ALL_FILES) == 156
    assert set(NOT_RENDERABLE) <= set(ALL_FILES)


@pytest.mark.parametrize("rel", ALL_FILES)
def test_every_corpus_file_renders_alone_or_says_why(rel: str) -> None:
    instances = instances_from_files([DICOM_DIR / rel])
    settings = RenderSettings(max_side=96)
    if rel in NOT_RENDERABLE:
        with pytest.raises(NothingRenderable) as caught:
            render_study(instances, settings)
        said = " | ".join([str(caught.value), *(why for _, why in instances.skipped)])
        assert NOT_RENDERABLE[rel] in said
        return
    rendered = render_study(instances, settings)
    assert rendered.key_images and not rendered.failures
    uids = {i.sop_instance_uid for i in instances}
    for key in rendered.key_images:
        pixels = png_array(key.png)
        assert pixels.shape[:2] == (key.height, key.width) and max(key.width, key.height) == 96
        assert key.sha256 == hashlib.sha256(key.png).hexdigest()
        assert set(key.sop_instance_uids) <= uids and key.frames and min(key.frames) >= 1
        assert key.label
    assert [d.chosen for d in rendered.decisions] == [True]


def test_a_bad_series_does_not_sink_the_study() -> None:
    paths = [
        DICOM_DIR / "ct/wg04_CT1/CT1_UNC.dcm",
        DICOM_DIR / "malformed/wg04_MR1_JPLY.dcm",
        DICOM_DIR / "malformed/dcm4che_will-jxl.dcm",
    ]
    # as index rows marked ORIGINAL, so the undecodable series are chosen rather than skipped as derived
    instances = [
        dataclasses.replace(i, image_type=("ORIGINAL", "PRIMARY"))
        for i in instances_from_files(paths)
    ]
    rendered = render_study(instances, RenderSettings())
    ct_series = instances[0].series_instance_uid
    assert {k.series_instance_uid for k in rendered.key_images} == {ct_series}
    reasons = dict(rendered.failures)
    assert "cannot decode pixel data" in reasons[instances[1].series_instance_uid]
    assert "1.2.840.10008.1.2.4.111" in reasons[instances[2].series_instance_uid]
    decisions = {d.series_instance_uid: d for d in rendered.decisions}
    assert "rendering failed" in decisions[instances[1].series_instance_uid].reason


def test_nothing_renderable_is_a_permanent_error_naming_each_series() -> None:
    instances = instances_from_files(
        [DICOM_DIR / "other/pydicom_test-SR.dcm", DICOM_DIR / "malformed/wg04_MR1_JPLY.dcm"]
    )
    with pytest.raises(PermanentError) as caught:
        render_study(instances, RenderSettings())
    assert isinstance(caught.value, NothingRenderable)
    message = str(caught.value)
    assert "structured report" in message and "cannot decode pixel data" in message
    with pytest.raises(NothingRenderable, match="no instances"):
        render_study([], RenderSettings())


def test_study_of_several_modalities_is_ordered_and_capped() -> None:
    paths = [
        *sorted((DICOM_DIR / "mr/series_dcm4che_wrist").glob("*.dcm")),
        DICOM_DIR / "cr_dx/fodicom_CR-MONO1-10-chest.dcm",
        DICOM_DIR / "us/fodicom_DIRW0007_echo_cine.dcm",
    ]
    rendered = render_study(instances_from_files(paths), RenderSettings(max_key_images=9))
    assert len(rendered.key_images) == 9
    # ranked by images x frames: US clip (65 frames), MR (16 slices), CR (1)
    assert [k.label.split()[0] for k in rendered.key_images] == ["US"] * 3 + ["MR"] * 5 + ["CR"]
    assert sum(d.chosen for d in rendered.decisions) == 3
    capped = render_study(instances_from_files(paths), RenderSettings(max_key_images=7))
    assert len(capped.key_images) == 7
    assert "max_key_images=7" in next(d.reason for d in capped.decisions if not d.chosen)


def test_cine_gives_representative_frames() -> None:
    path = DICOM_DIR / "xa_nm_pt/fodicom_HasFragmentSequence_XA.dcm"
    rendered = render_study(instances_from_files([path]), RenderSettings(frames_per_cine=4))
    assert [k.frames for k in rendered.key_images] == [(13,), (37,), (61,), (85,)]
    assert all("cine frame" in k.label for k in rendered.key_images)


def test_several_views_become_several_key_images(tmp_path: Path) -> None:
    from pydicom import dcmread
    from pydicom.uid import generate_uid

    src = DICOM_DIR / "cr_dx/highdicom_dx_image.dcm"
    paths = []
    for n, view in enumerate(("PA", "LL"), start=1):
        ds = dcmread(src)
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = n
        ds.ViewPosition = view
        path = tmp_path / f"{view}.dcm"
        ds.save_as(path)
        paths.append(path)
    rendered = render_study(instances_from_files(paths), RenderSettings())
    assert [
        k.label.endswith(f"view {n}/2") for n, k in enumerate(rendered.key_images, start=1)
    ] == [True, True]


def test_montage_of_a_volume() -> None:
    paths = sorted((DICOM_DIR / "mr/series_dcm4che_wrist").glob("*.dcm"))
    rendered = render_study(instances_from_files(paths), RenderSettings(montage=True))
    sheet = rendered.key_images[0]
    assert "montage of 5 slices" in sheet.label
    assert len(sheet.sop_instance_uids) == 5 and max(sheet.width, sheet.height) == 336
    assert [k.sop_instance_uids[0] for k in rendered.key_images[1:6]] == list(
        sheet.sop_instance_uids
    )


def test_ct_windows_follow_the_study_region(tmp_path: Path) -> None:
    from pydicom import dcmread

    src = DICOM_DIR / "ct/libdicom_ct_brain_single.dcm"
    head = render_study(instances_from_files([src]), RenderSettings())
    assert [k.window for k in head.key_images] == ["C40/W80 brain", "C400/W1800 bone"] or [
        k.window for k in head.key_images
    ] == ["C40/W400 soft tissue", "C400/W1800 bone"]
    ds = dcmread(src)
    ds.BodyPartExamined = "CHEST"
    chest = tmp_path / "chest.dcm"
    ds.save_as(chest)
    rendered = render_study(instances_from_files([chest]), RenderSettings())
    assert [k.window for k in rendered.key_images] == ["C40/W400 soft tissue", "C-600/W1500 lung"]
    rendered = render_study(instances_from_files([chest]), RenderSettings(ct_window_presets=False))
    assert [k.window for k in rendered.key_images] == [
        f"C{float(ds.WindowCenter):g}/W{float(ds.WindowWidth):g} header"
    ]


def test_only_the_chosen_slices_are_decoded(tmp_path: Path) -> None:
    """Slices that are not chosen may have broken pixels: selection and ordering read headers only."""
    from pydicom import dcmread

    originals = sorted((DICOM_DIR / "mr/series_dcm4che_wrist").glob("*.dcm"))
    reference = render_study(instances_from_files(originals), RenderSettings())
    chosen = {uid for k in reference.key_images for uid in k.sop_instance_uids}
    copies = []
    for src in originals:
        ds = dcmread(src)
        if ds.SOPInstanceUID not in chosen:
            ds.PixelData = b"\x00\x00"  # undecodable: 2 bytes for a 256 x 256 image
        path = tmp_path / src.name
        ds.save_as(path)
        copies.append(path)
    rendered = render_study(instances_from_files(copies), RenderSettings())
    assert [k.sha256 for k in rendered.key_images] == [k.sha256 for k in reference.key_images]
    assert len(chosen) == 5 < len(copies)
