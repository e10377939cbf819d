"""Key images when studies are as hospitals send them (issue 11, items 5-8): an undecodable
instance in a series, a header window of width 0, lung and bone reconstructions without a header
window, and series that arrive in any order. Real corpus series, changed only where named."""

from __future__ import annotations

import dataclasses
import itertools
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy.engine import Engine

from ground.db import session_scope
from integrations.dicom.index import study_by_uid
from integrations.dicom.ingest import ingest_file
from storage import FileStorage
from tests.conftest import DICOM_DIR
from workers.render import instances_from_files, render_study
from workers.render.output import provenance
from workers.render.pixels import to_display
from workers.render_config import RenderSettings
from workers.service import instance_inputs

from .conftest import png_array

CT3 = sorted((DICOM_DIR / "ct" / "series_dcmqi_ct3slice").glob("*.dcm"))
WRIST = sorted((DICOM_DIR / "mr" / "series_dcm4che_wrist").iterdir())
NM = DICOM_DIR / "xa_nm_pt" / "wg04_NM1" / "NM1_JPLL.dcm"


def test_an_undecodable_instance_is_skipped_and_the_series_renders(tmp_path: Path) -> None:
    """Item 5: the slice the renderer would pick is damaged; another slice takes its place."""
    settings = RenderSettings()
    good = render_study(instances_from_files(WRIST), settings)
    picked = good.key_images[-1].sop_instance_uids[0]
    series = tmp_path / "wrist"
    shutil.copytree(WRIST[0].parent, series)
    (damaged,) = [p for p in series.iterdir() if str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) == picked]
    damaged.write_bytes(damaged.read_bytes()[:-20000])  # Pixel Data cut: cannot be decoded
    rendered = render_study(instances_from_files(sorted(series.iterdir())), settings)
    assert rendered.failures == []
    assert len(rendered.key_images) == len(good.key_images)
    assert all(picked not in ki.sop_instance_uids for ki in rendered.key_images)
    ((series_uid, sop, why),) = rendered.skipped
    assert sop == picked and "cannot decode pixel data" in why
    (decision,) = rendered.decisions
    assert decision.chosen and f"instance {picked} skipped" in decision.reason
    assert provenance(rendered)["skipped_instances"] == [
        {"series_instance_uid": series_uid, "sop_instance_uid": picked, "reason": why}]


def test_a_header_window_of_width_zero_falls_back_to_the_pixel_range(tmp_path: Path) -> None:
    """Item 6: as some PET/NM headers say; the window then spans the values present."""
    ds = dcmread(NM)
    ds.WindowCenter, ds.WindowWidth = 0, 0
    path = tmp_path / "nm_w0.dcm"
    ds.save_as(path, enforce_file_format=False)
    rendered = render_study(instances_from_files([path]), RenderSettings())
    (ki,) = rendered.key_images
    values = ds.pixel_array.astype(np.float64) * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
    lo, hi = float(values.min()), float(values.max())
    assert ki.window == f"C{round((lo + hi) / 2, 4):g}/W{round(hi - lo, 4):g} pixel range"
    shown = to_display(ds.pixel_array, ds, 0)  # before resizing: the whole range, end to end
    assert shown.window == ki.window and shown.pixels.min() == 0 and shown.pixels.max() == 255
    assert png_array(ki.png).shape[:2] == (ki.height, ki.width)


@pytest.mark.parametrize(("kernel", "description", "first_window"), [
    ("LUNG", "", "C-600/W1500 lung"),
    ("STANDARD", "Lung 1.25mm", "C-600/W1500 lung"),
    ("BONEPLUS", "", "C400/W1800 bone"),
    ("STANDARD", "", None),  # the series says nothing: the study's region or the pixels decide
])
def test_ct_windows_follow_what_the_reconstruction_is_for(
    tmp_path: Path, kernel: str, description: str, first_window: str | None
) -> None:
    """Item 7: a lung-kernel reconstruction without a header window is shown in the lung window."""
    paths = []
    for n, src in enumerate(CT3):
        ds = dcmread(src)
        del ds.WindowCenter, ds.WindowWidth
        ds.ConvolutionKernel = kernel
        ds.SeriesDescription = description
        paths.append(tmp_path / f"{n}.dcm")
        ds.save_as(paths[-1], enforce_file_format=False)
    rendered = render_study(instances_from_files(paths), RenderSettings(montage=False))
    windows = [ki.window for ki in rendered.key_images]
    if first_window is None:
        assert windows[0] == "C40/W400 soft tissue"
    else:
        assert windows[0] == first_window
        assert windows[-1].endswith("soft tissue window") is False and "C40/W400 soft tissue" in windows


def _late_phase_study(out: Path) -> list[list[Path]]:
    """One CT study of two phase series from the real three-slice series: the arterial phase as
    sent, and a delayed phase (re-identified copies) whose instances carry no Instance Number and
    one of which is a derived image (a reformat saved into the series)."""
    study_uid = str(dcmread(CT3[0], stop_before_pixels=True).StudyInstanceUID)
    delayed_uid = generate_uid()
    arterial, delayed = [], []
    for n, src in enumerate(CT3):
        ds = dcmread(src)
        ds.SeriesDescription = "ARTERIAL"
        arterial.append(out / f"a{n}.dcm")
        ds.save_as(arterial[-1], enforce_file_format=False)
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription = delayed_uid, 900, "DELAYED"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        del ds.InstanceNumber
        if n == 1:
            ds.ImageType = ["DERIVED", "SECONDARY", "REFORMATTED"]
        assert ds.StudyInstanceUID == study_uid
        delayed.append(out / f"d{n}.dcm")
        ds.save_as(delayed[-1], enforce_file_format=False)
    return [arterial, delayed]


def test_series_selection_does_not_depend_on_arrival_order(engine: Engine, tmp_path: Path) -> None:
    """Item 8: the same study, indexed in different orders (on SQLite and PostgreSQL), gives the
    same chosen series, key images and provenance."""
    arterial, delayed = _late_phase_study(tmp_path)
    d0, d1, d2 = delayed  # d1 is the derived image
    orders = [arterial + delayed, [d1, d0, d2, *arterial], [d2, d1, d0, *arterial],
              [p for pair in itertools.zip_longest([d1, d2, d0], arterial) for p in pair if p]]
    settings = RenderSettings(max_series=1, montage=False)
    results = []
    for k, order in enumerate(orders):
        storage = FileStorage(tmp_path / f"storage{k}")
        for path in order:
            staged = storage.staging_file(delete=False, suffix=".dcm")
            staged.write(path.read_bytes())
            staged.close()
            ingest_file(engine=engine, storage=storage, staged=Path(staged.name), calling_ae="PACS")
        with session_scope(engine) as s:
            study = study_by_uid(s, str(dcmread(arterial[0], stop_before_pixels=True).StudyInstanceUID))
            assert study is not None
            inputs = instance_inputs(SimpleNamespace(storage=storage), s, study)  # type: ignore[arg-type]
        rendered = render_study(inputs, settings)
        results.append((provenance(rendered), [ki.sha256 for ki in rendered.key_images]))
        with session_scope(engine) as s:  # empty the index for the next order
            from sqlalchemy import text
            for table in ("instance", "series", "study", "patient"):
                s.execute(text(f"DELETE FROM {table}"))
    first = results[0]
    assert all(r == first for r in results[1:]), [
        [d["reason"][:60] for d in r[0]["decisions"]] for r in results]
    assert [d["chosen"] for d in first[0]["decisions"]] == [True, False]


def test_render_is_a_function_of_the_instances_not_their_listing_order() -> None:
    """Item 8, without the index: every permutation of the listed instances gives one result."""
    rows = list(instances_from_files(CT3 + WRIST[:4]))
    base = render_study(rows, RenderSettings())
    for perm in (rows[::-1], rows[3:] + rows[:3]):
        again = render_study(perm, RenderSettings())
        assert [k.sha256 for k in again.key_images] == [k.sha256 for k in base.key_images]
        assert again.decisions == base.decisions
        assert dataclasses.asdict(again) == dataclasses.asdict(base)
