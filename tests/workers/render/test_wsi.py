"""Whole-slide microscopy: level choice, tile assembly (full, sparse, edge tiles), tissue patches."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.pixels import pixel_array
from pydicom.sequence import Sequence
from pydicom.uid import JPEGBaseline8Bit

from workers.render import instances_from_files, render_study
from workers.render.wsi import (
    assemble,
    choose_level,
    pyramid,
    read_level,
    tissue_mask,
    tissue_spots,
)
from workers.render_config import RenderSettings

from .conftest import png_array

PYRAMID = "sm/cmu1_small_region_pyramid"
TINY = "sm/highdicom_sm_image.dcm"


@pytest.fixture(scope="module")
def slide(corpus: Path) -> list:  # type: ignore[type-arg]
    return instances_from_files(sorted((corpus / PYRAMID).glob("*.dcm")))


@pytest.fixture(scope="module")
def corpus() -> Path:
    from .conftest import CORPUS

    return CORPUS


def test_level_closest_to_target_and_overview(slide: list) -> None:  # type: ignore[type-arg]
    levels = pyramid(slide)
    assert len(levels) == 12 and levels[0].total_cols == 2220 and levels[0].total_rows == 2967
    assert choose_level(levels, 336).longest == 370
    assert choose_level(levels, 600).longest == 741
    assert choose_level(levels, 5000).longest == 2967
    rendered = render_study(slide, RenderSettings())
    overview = rendered.key_images[0]
    assert overview.label.startswith("slide overview (277x370")
    assert (overview.width, overview.height) == (252, 336)
    assert overview.sop_instance_uids == (
        levels[[lv.longest for lv in levels].index(370)].instance.sop_instance_uid,
    )


def test_tiles_land_in_place(slide: list) -> None:  # type: ignore[type-arg]
    """Level 2 assembled from its 4 tiles (edge tiles beyond the matrix) matches level 3 downsampled."""
    levels = {lv.longest: lv for lv in pyramid(slide)}
    big, _ = assemble(levels[741], 0, 0, 741, 555)
    small, frames = assemble(levels[370], 0, 0, 370, 277)
    assert frames == (1,)
    reduced = np.asarray(Image.fromarray(big).resize((277, 370), Image.Resampling.BOX)).astype(
        float
    )
    corr = np.corrcoef(reduced.mean(axis=2).ravel(), small.astype(float).mean(axis=2).ravel())[0, 1]
    assert corr > 0.9  # a misplaced 500 px tile would break the match


def test_high_magnification_patches_show_tissue(slide: list) -> None:  # type: ignore[type-arg]
    rendered = render_study(slide, RenderSettings(wsi_patches=3))
    patches = rendered.key_images[1:]
    assert len(patches) == 3
    top = pyramid(slide)[0]
    for patch in patches:
        assert "high-magnification patch" in patch.label
        assert patch.sop_instance_uids == (top.instance.sop_instance_uid,)
        assert set(patch.frames) <= set(range(1, 31)) and len(patch.frames) <= 4
        pixels = png_array(patch.png)
        assert pixels.shape == (336, 336, 3)
        assert tissue_mask(pixels).mean() > 0.5  # tissue, not empty glass
    assert len({p.label for p in patches}) == 3


def test_tissue_spots_skip_glass() -> None:
    mask = np.zeros((100, 100), dtype=bool)
    mask[60:90, 10:40] = True
    spots = tissue_spots(mask, 20, 20, 3)
    assert spots and all(60 <= r <= 70 and 10 <= c <= 20 for r, c in spots[:1])
    assert tissue_spots(np.zeros((50, 50), dtype=bool), 10, 10, 3) == []


def _tiny(corpus: Path) -> tuple[Dataset, np.ndarray, np.ndarray]:
    ds = dcmread(corpus / TINY)
    frames = pixel_array(ds)  # 25 x 10 x 10 x 3, row-major tiles of a 50 x 50 matrix
    full = np.zeros((50, 50, 3), dtype=np.uint8)
    for i, tile in enumerate(frames):
        r, c = divmod(i, 5)
        full[r * 10 : r * 10 + 10, c * 10 : c * 10 + 10] = tile
    return ds, frames, full


def test_tiled_full_tiny_instance(corpus: Path) -> None:
    _, _, full = _tiny(corpus)
    level = read_level(instances_from_files([corpus / TINY])[0])
    region, frames = assemble(level, 0, 0, 50, 50)
    assert np.array_equal(region, full) and frames == tuple(range(1, 26))
    part, frames = assemble(level, 15, 25, 10, 10)  # overlaps 4 tiles only
    assert np.array_equal(part, full[15:25, 25:35]) and len(frames) == 4


def test_tiled_sparse_uses_plane_positions(corpus: Path, tmp_path: Path) -> None:
    ds, frames, full = _tiny(corpus)
    order = [i for i in reversed(range(25)) if i not in (6, 18)]  # shuffled and two tiles missing
    items = []
    for i in order:
        r, c = divmod(i, 5)
        pos = Dataset()
        pos.RowPositionInTotalImagePixelMatrix = r * 10 + 1
        pos.ColumnPositionInTotalImagePixelMatrix = c * 10 + 1
        pos.XOffsetInSlideCoordinateSystem = 0.0
        pos.YOffsetInSlideCoordinateSystem = 0.0
        pos.ZOffsetInSlideCoordinateSystem = 0.0
        item = Dataset()
        item.PlanePositionSlideSequence = Sequence([pos])
        items.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(items)
    ds.DimensionOrganizationType = "TILED_SPARSE"
    ds.NumberOfFrames = len(order)
    ds.PixelData = frames[order].tobytes()
    path = tmp_path / "sparse.dcm"
    ds.save_as(path)
    level = read_level(instances_from_files([path])[0])
    region, _ = assemble(level, 0, 0, 50, 50)
    expected = full.copy()
    for missing in (6, 18):
        r, c = divmod(missing, 5)
        expected[r * 10 : r * 10 + 10, c * 10 : c * 10 + 10] = 255  # glass
    assert np.array_equal(region, expected)


def test_edge_tiles_beyond_the_matrix_are_clipped(corpus: Path, tmp_path: Path) -> None:
    ds, _, full = _tiny(corpus)
    ds.TotalPixelMatrixRows = 45
    ds.TotalPixelMatrixColumns = 47
    path = tmp_path / "edges.dcm"
    ds.save_as(path)
    level = read_level(instances_from_files([path])[0])
    region, _ = assemble(level, 0, 0, 45, 47)
    assert np.array_equal(region, full[:45, :47])
    rendered = render_study(instances_from_files([path]), RenderSettings())
    assert (rendered.key_images[0].width, rendered.key_images[0].height) == (336, 322)


def test_edge_tiles_encoded_smaller_than_declared(corpus: Path, tmp_path: Path) -> None:
    """JPEG edge tiles cut to the matrix (12 and 8 pixels) although Rows/Columns say 16."""
    ds, _, full = _tiny(corpus)
    source = np.asarray(Image.fromarray(full).resize((44, 40), Image.Resampling.BILINEAR))
    tiles = []
    for r in range(0, 40, 16):
        for c in range(0, 44, 16):
            buf = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(source[r : r + 16, c : c + 16])).save(
                buf, "JPEG", quality=100, subsampling=0
            )
            tiles.append(buf.getvalue())
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PhotometricInterpretation = "YBR_FULL"
    ds.Rows = ds.Columns = 16
    ds.TotalPixelMatrixRows, ds.TotalPixelMatrixColumns = 40, 44
    ds.NumberOfFrames = len(tiles)
    ds.PixelData = encapsulate(tiles)
    ds["PixelData"].VR = "OB"
    path = tmp_path / "small_edges.dcm"
    ds.save_as(path)
    level = read_level(instances_from_files([path])[0])
    region, frames = assemble(level, 0, 0, 40, 44)
    assert frames == tuple(range(1, 10))
    assert np.abs(region.astype(int) - source.astype(int)).mean() < 4
