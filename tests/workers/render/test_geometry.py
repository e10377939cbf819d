"""Geometric ordering from Image Position/Orientation (Patient), never Instance Number."""

from __future__ import annotations

import dataclasses
import random
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from workers.render import instances_from_files, render_study
from workers.render.geometry import (
    distinct_positions,
    order_frames,
    order_instances,
    pick_representatives,
    plane_name,
    slice_normal,
)
from workers.render.headers import read_header
from workers.render_config import RenderSettings

File = Callable[[str], Path]


def _shuffled_copies(src_dir: Path, dst: Path, seed: int) -> list[Path]:
    """Copies of a series whose Instance Numbers are a random permutation (and reversed files)."""
    files = sorted(src_dir.glob("*.dcm"))
    numbers = list(range(1, len(files) + 1))
    random.Random(seed).shuffle(numbers)
    out = []
    for n, src in zip(numbers, files, strict=True):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = dcmread(src)
        ds.InstanceNumber = n
        path = dst / f"{n:03d}.dcm"
        ds.save_as(path)
        out.append(path)
    return out


def _true_order(paths: list[Path]) -> list[str]:
    """SOP Instance UIDs sorted by position along the normal, computed here from the headers."""
    rows = []
    for p in paths:
        ds = dcmread(p, stop_before_pixels=True)
        iop = [float(v) for v in ds.ImageOrientationPatient]
        normal = np.cross(iop[:3], iop[3:])
        rows.append(
            (float(np.dot(normal, [float(v) for v in ds.ImagePositionPatient])), ds.SOPInstanceUID)
        )
    return [uid for _, uid in sorted(rows)]


@pytest.mark.parametrize("series", ["mr/series_dcm4che_wrist", "ct/series_dcmqi_ct3slice"])
@pytest.mark.parametrize("seed", [1, 2])
def test_order_holds_when_instance_numbers_are_shuffled(
    corpus: Path, tmp_path: Path, series: str, seed: int
) -> None:
    paths = _shuffled_copies(corpus / series, tmp_path, seed)
    truth = _true_order(paths)
    instances = instances_from_files(paths)
    numbers = [
        i.instance_number for i in sorted(instances, key=lambda i: truth.index(i.sop_instance_uid))
    ]
    assert numbers != sorted(numbers)  # Instance Number order would be wrong
    random.Random(seed).shuffle(instances)
    ordering = order_instances(instances)
    assert [s.instance.sop_instance_uid for s in ordering.slices] == truth
    positions = [s.position for s in ordering.slices]
    assert positions == sorted(positions)
    # end to end: every slice chosen, key images in geometric order
    settings = RenderSettings(slices_per_volume=len(paths), ct_window_presets=False)
    rendered = render_study(instances, settings)
    assert [k.sop_instance_uids[0] for k in rendered.key_images] == truth


def test_representatives_come_from_headers_and_spread_over_the_volume(corpus: Path) -> None:
    paths = sorted((corpus / "mr/series_dcm4che_wrist").glob("*.dcm"))
    ordering = order_instances(instances_from_files(paths))
    slices = distinct_positions(ordering.slices)
    picks = pick_representatives([s.position for s in slices], 5)
    assert len(picks) == 5 and picks == sorted(picks)
    assert picks[0] > 0 and picks[-1] < len(slices) - 1  # the edge slices are avoided
    rendered = render_study(instances_from_files(paths), RenderSettings())
    assert [k.sop_instance_uids[0] for k in rendered.key_images] == [
        slices[i].instance.sop_instance_uid for i in picks
    ]
    assert all("slice" in k.label and "mm" in k.label for k in rendered.key_images)


def test_pick_representatives_respects_uneven_spacing() -> None:
    positions = [0.0, 1.0, 2.0, 3.0, 4.0, 50.0, 100.0]
    assert pick_representatives(positions, 2) == [4, 5]  # targets 25 mm and 75 mm, nearest slices
    assert pick_representatives(positions, 10) == list(range(7))
    assert pick_representatives([None] * 10, 3) == [1, 5, 8]
    assert pick_representatives([], 3) == []


def test_missing_geometry_falls_back_to_instance_number(corpus: Path) -> None:
    paths = sorted((corpus / "mr/series_dcm4che_wrist").glob("*.dcm"))
    instances = [
        dataclasses.replace(i, image_position_patient=None) for i in instances_from_files(paths)
    ]
    ordering = order_instances(list(reversed(instances)))
    assert "instance number" in ordering.method
    numbers = [s.instance.instance_number for s in ordering.slices]
    assert numbers == sorted(numbers)


def test_enhanced_frames_ordered_by_plane_position_sequence(
    corpus_file: File, tmp_path: Path
) -> None:
    src = corpus_file("ct/pydicom-data_eCT_Supplemental.dcm")
    inst = instances_from_files([src])[0]
    ordering = order_frames(read_header(src), inst)
    assert ordering is not None and ordering.plane == "axial"
    # normal of (-1,0,0 / 0,1,0) is -z: frame 2 (z -149) comes before frame 1 (z -159)
    assert [s.frame for s in ordering.slices] == [1, 0]
    # swap the two frames' positions: the order must follow the positions, not the frame numbers
    ds = dcmread(src)
    seq = ds.PerFrameFunctionalGroupsSequence
    a = seq[0].PlanePositionSequence[0].ImagePositionPatient
    b = seq[1].PlanePositionSequence[0].ImagePositionPatient
    seq[0].PlanePositionSequence[0].ImagePositionPatient = list(b)
    seq[1].PlanePositionSequence[0].ImagePositionPatient = list(a)
    swapped = tmp_path / "swapped.dcm"
    ds.save_as(swapped)
    ordering = order_frames(read_header(swapped), instances_from_files([swapped])[0])
    assert ordering is not None and [s.frame for s in ordering.slices] == [0, 1]
    rendered = render_study(
        instances_from_files([swapped]), RenderSettings(ct_window_presets=False)
    )
    assert [k.frames for k in rendered.key_images] == [(1,), (2,)]


def test_temporal_enhanced_series_is_not_a_volume(corpus_file: File) -> None:
    src = corpus_file("mr/fodicom_MOVEKNEE_enhanced.dcm")
    assert order_frames(read_header(src), instances_from_files([src])[0]) is None
    rendered = render_study(instances_from_files([src]), RenderSettings(frames_per_cine=3))
    assert [k.frames for k in rendered.key_images] == [(4,), (10,), (16,)]


def test_plane_names_and_normals() -> None:
    assert plane_name((1, 0, 0, 0, 1, 0)) == "axial"
    assert plane_name((1, 0, 0, 0, 0, -1)) == "coronal"
    assert plane_name((0, 1, 0, 0, 0, -1)) == "sagittal"
    assert plane_name(None) == ""
    assert np.allclose(slice_normal((1, 0, 0, 0, 1, 0)), (0, 0, 1))
    with pytest.raises(ValueError, match="parallel"):
        slice_normal((1, 0, 0, 1, 0, 0))


def test_mixed_orientations_use_the_main_group(corpus: Path) -> None:
    paths = sorted((corpus / "mr/series_dcm4che_wrist").glob("*.dcm"))
    instances = instances_from_files(paths)
    odd = dataclasses.replace(
        instances[0], sop_instance_uid="9.9", image_orientation_patient=(0, 1, 0, 0, 0, -1)
    )
    ordering = order_instances([*instances, odd])
    assert "share the main orientation" in ordering.method
    assert "9.9" not in [s.instance.sop_instance_uid for s in ordering.slices]


def test_images_at_one_location_are_spread_over_acquisition_order(corpus: Path) -> None:
    paths = sorted((corpus / "mr/series_dcm4che_wrist").glob("*.dcm"))[:4]
    instances = instances_from_files(paths)
    same_place = [
        dataclasses.replace(i, image_position_patient=instances[0].image_position_patient)
        for i in instances
    ]
    rendered = render_study(same_place, RenderSettings(slices_per_volume=3))
    assert len(rendered.key_images) == 3
    assert len({k.sop_instance_uids for k in rendered.key_images}) == 3
