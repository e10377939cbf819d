"""Whole-slide microscopy (VL WSI, PS3.3 A.32.8): a slide overview and high-magnification patches.

Why pydicom alone and not wsidicom: every pyramid level is one instance that the listener already
indexes, so choosing a level needs only the per-instance headers (Total Pixel Matrix Columns/Rows,
tile size, Dimension Organization Type); pydicom's ``iter_pixels`` then decodes exactly the tiles a
region needs, with the same decoder plugins as every other modality. wsidicom would add a second
decoding stack and open the slide as a whole (all instances grouped) to answer the same question,
and is not a dependency of Taqrir. The tile geometry rules are short: TILED_FULL tiles are implicit
in row-major order (PS3.3 C.7.6.17.3), TILED_SPARSE tiles carry Plane Position (Slide)
(PS3.3 C.8.12.6.1).
"""

from __future__ import annotations

import io
import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames

from .errors import SeriesRenderError
from .headers import read_header
from .model import InstanceInput
from .pixels import read_frames, to_display

logger = logging.getLogger(__name__)

#: Glass is near-white and unsaturated; tissue (H&E) is darker or coloured.
_GLASS_BRIGHTNESS = 220
_TISSUE_SATURATION = 20


@dataclass(frozen=True, slots=True)
class Tile:
    """One frame (0-based index) and where its top-left pixel sits in the total pixel matrix."""

    frame: int
    row: int
    col: int


@dataclass(frozen=True, slots=True)
class WsiLevel:
    """One pyramid level (one instance): its size and its tiles."""

    instance: InstanceInput
    total_rows: int
    total_cols: int
    tile_rows: int
    tile_cols: int
    tiles: tuple[Tile, ...]
    organization: str

    @property
    def longest(self) -> int:
        return max(self.total_rows, self.total_cols)


def _tiles(
    ds: Dataset, total_rows: int, total_cols: int, tile_rows: int, tile_cols: int
) -> list[Tile]:
    """Tiles of the first focal plane and optical path."""
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    organization = str(ds.get("DimensionOrganizationType", "") or "").upper()
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if organization == "TILED_FULL" or not per_frame:
        across = math.ceil(total_cols / tile_cols)
        down = math.ceil(total_rows / tile_rows)
        count = min(frames, across * down)
        return [Tile(i, (i // across) * tile_rows, (i % across) * tile_cols) for i in range(count)]
    tiles: list[Tile] = []
    first_z: float | None = None
    first_path: str | None = None
    for i, item in enumerate(per_frame):
        pos_seq = item.get("PlanePositionSlideSequence")
        if not pos_seq:
            raise SeriesRenderError(
                f"TILED_SPARSE frame {i + 1} has no Plane Position (Slide) Sequence"
            )
        pos = pos_seq[0]
        z = pos.get("ZOffsetInSlideCoordinateSystem")
        path_seq = item.get("OpticalPathIdentificationSequence")
        path_id = str(path_seq[0].get("OpticalPathIdentifier", "")) if path_seq else ""
        if first_z is None:
            first_z = float(z) if z is not None else 0.0
            first_path = path_id
        if (z is not None and abs(float(z) - first_z) > 1e-6) or path_id != first_path:
            continue
        row = int(pos.RowPositionInTotalImagePixelMatrix) - 1
        col = int(pos.ColumnPositionInTotalImagePixelMatrix) - 1
        tiles.append(Tile(i, row, col))
    return tiles


def read_level(instance: InstanceInput) -> WsiLevel:
    """Read one level's header and tile layout (no pixels)."""
    try:
        ds = read_header(instance.path)
    except ValueError as err:
        raise SeriesRenderError(f"{instance.path.name}: {err}") from err
    tile_rows = int(ds.get("Rows") or 0)
    tile_cols = int(ds.get("Columns") or 0)
    total_rows = int(ds.get("TotalPixelMatrixRows") or tile_rows)
    total_cols = int(ds.get("TotalPixelMatrixColumns") or tile_cols)
    if min(tile_rows, tile_cols, total_rows, total_cols) <= 0:
        raise SeriesRenderError(
            f"{instance.path.name}: missing Rows/Columns or Total Pixel Matrix size"
        )
    tiles = _tiles(ds, total_rows, total_cols, tile_rows, tile_cols)
    return WsiLevel(
        instance=instance,
        total_rows=total_rows,
        total_cols=total_cols,
        tile_rows=tile_rows,
        tile_cols=tile_cols,
        tiles=tuple(tiles),
        organization=str(ds.get("DimensionOrganizationType", "") or "TILED_FULL"),
    )


def pyramid(instances: Sequence[InstanceInput]) -> list[WsiLevel]:
    """The VOLUME levels of a slide, largest first (LABEL, OVERVIEW and THUMBNAIL images left out)."""
    levels: list[WsiLevel] = []
    seen_sizes: set[tuple[int, int]] = set()
    for inst in instances:
        flavour = inst.image_type[2] if len(inst.image_type) > 2 else "VOLUME"
        if flavour not in ("VOLUME", ""):
            continue
        level = read_level(inst)
        size = (level.total_rows, level.total_cols)
        if size in seen_sizes:
            continue  # another optical path or concatenation of a level already found
        seen_sizes.add(size)
        levels.append(level)
    if not levels:
        raise SeriesRenderError(
            "no VOLUME image in the whole-slide series (only label/overview images)"
        )
    return sorted(levels, key=lambda lv: -lv.longest)


def choose_level(levels: Sequence[WsiLevel], target: int) -> WsiLevel:
    """The smallest level whose longest side still covers ``target`` pixels (else the largest)."""
    covering = [lv for lv in levels if lv.longest >= target]
    if covering:
        return min(covering, key=lambda lv: lv.longest)
    return max(levels, key=lambda lv: lv.longest)


def _pillow_frames(path: Path, indices: Sequence[int]) -> dict[int, np.ndarray]:
    """Decode encapsulated frames with Pillow: tolerates edge tiles encoded smaller than Rows x Columns."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = dcmread(path, force=True)
    if not ds.file_meta.TransferSyntaxUID.is_encapsulated:
        raise SeriesRenderError(f"{path.name}: native tiles do not match the declared tile size")
    wanted = set(indices)
    out: dict[int, np.ndarray] = {}
    nr = int(ds.get("NumberOfFrames", 1) or 1)
    for i, data in enumerate(generate_frames(ds.PixelData, number_of_frames=nr)):
        if i in wanted:
            try:
                with Image.open(io.BytesIO(data)) as img:
                    out[i] = np.asarray(img.convert("RGB"))
            except OSError as err:
                raise SeriesRenderError(f"{path.name}: tile {i + 1} undecodable ({err})") from err
    return out


def decode_tiles(level: WsiLevel, indices: Sequence[int]) -> tuple[Dataset, dict[int, np.ndarray]]:
    """Decode some tiles of a level to 8-bit RGB display pixels (frame index -> H x W x 3)."""
    try:
        ds, raw = read_frames(level.instance.path, indices)
    except SeriesRenderError as err:
        logger.info("tile decoding fell back to Pillow for %s: %s", level.instance.path.name, err)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = read_header(level.instance.path)
        return ds, _pillow_frames(level.instance.path, indices)
    out: dict[int, np.ndarray] = {}
    for i, arr in raw.items():
        pixels = to_display(arr, ds, i).pixels
        out[i] = pixels if pixels.ndim == 3 else np.repeat(pixels[..., None], 3, axis=2)
    return ds, out


def assemble(
    level: WsiLevel, row0: int, col0: int, rows: int, cols: int
) -> tuple[np.ndarray, tuple[int, ...]]:
    """The region [row0:row0+rows, col0:col0+cols] of a level, from only the tiles it overlaps.

    Tiles are clipped to the total pixel matrix, so edge tiles that are padded beyond it, or encoded
    smaller than declared, both land where they belong. Missing tiles (sparse) stay white (glass).
    """
    canvas = np.full((rows, cols, 3), 255, dtype=np.uint8)
    needed = [
        t
        for t in level.tiles
        if t.row < row0 + rows
        and t.row + level.tile_rows > row0
        and t.col < col0 + cols
        and t.col + level.tile_cols > col0
    ]
    if not needed:
        return canvas, ()
    _, decoded = decode_tiles(level, [t.frame for t in needed])
    for t in needed:
        tile = decoded.get(t.frame)
        if tile is None:
            continue
        th = min(tile.shape[0], level.tile_rows, level.total_rows - t.row)
        tw = min(tile.shape[1], level.tile_cols, level.total_cols - t.col)
        r_src0 = max(row0 - t.row, 0)
        c_src0 = max(col0 - t.col, 0)
        r_src1 = min(th, row0 + rows - t.row)
        c_src1 = min(tw, col0 + cols - t.col)
        if r_src1 <= r_src0 or c_src1 <= c_src0:
            continue
        r_dst = t.row + r_src0 - row0
        c_dst = t.col + c_src0 - col0
        canvas[r_dst : r_dst + r_src1 - r_src0, c_dst : c_dst + c_src1 - c_src0] = tile[
            r_src0:r_src1, c_src0:c_src1, :3
        ]
    return canvas, tuple(sorted(t.frame + 1 for t in needed))


def tissue_mask(rgb: np.ndarray) -> np.ndarray:
    """True where the overview shows tissue rather than bright, unsaturated glass."""
    arr = rgb.astype(np.int16)
    brightness = arr.mean(axis=2)
    saturation = arr.max(axis=2) - arr.min(axis=2)
    mask: np.ndarray = (brightness < _GLASS_BRIGHTNESS) | (
        (saturation > _TISSUE_SATURATION) & (brightness < 245)
    )
    return mask


def tissue_spots(
    mask: np.ndarray, box_rows: int, box_cols: int, count: int, min_fraction: float = 0.3
) -> list[tuple[int, int]]:
    """Top-left corners (in mask pixels) of up to ``count`` non-overlapping boxes richest in tissue."""
    h, w = mask.shape
    box_rows = max(1, min(box_rows, h))
    box_cols = max(1, min(box_cols, w))
    integral = np.zeros((h + 1, w + 1), dtype=np.int64)
    integral[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0), axis=1)
    sums = (
        integral[box_rows:, box_cols:]
        - integral[:-box_rows, box_cols:]
        - integral[box_rows:, :-box_cols]
        + integral[:-box_rows, :-box_cols]
    ).astype(np.float64) / (box_rows * box_cols)
    spots: list[tuple[int, int]] = []
    for _ in range(count):
        idx = int(np.argmax(sums))
        r, c = divmod(idx, sums.shape[1])
        if sums[r, c] < min_fraction:
            break
        spots.append((r, c))
        sums[max(0, r - box_rows) : r + box_rows, max(0, c - box_cols) : c + box_cols] = -1.0
    return spots
