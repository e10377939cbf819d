"""PNG writer and sizing."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from workers.render.encode import encode_png, fit, montage, png_bytes

from .conftest import png_array


@pytest.mark.parametrize("shape", [(7, 5), (64, 33), (20, 31, 3), (1, 1), (1, 1, 3)])
def test_encode_png_round_trips_through_pillow(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
    assert np.array_equal(png_array(encode_png(pixels)), pixels)


def test_encode_png_is_deterministic_and_refuses_wrong_types() -> None:
    pixels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    assert encode_png(pixels) == encode_png(pixels.copy())
    with pytest.raises(ValueError, match="uint8"):
        encode_png(pixels.astype(np.uint16))
    with pytest.raises(ValueError, match="1 or 3 channels"):
        encode_png(np.zeros((4, 4, 4), dtype=np.uint8))


@pytest.mark.parametrize(
    ("h", "w", "expected"),
    [
        (512, 512, (336, 336)),
        (1955, 1841, (316, 336)),
        (64, 64, (336, 336)),
        (1024, 256, (84, 336)),
    ],
)
def test_fit_keeps_aspect_longest_side_is_max_side(
    h: int, w: int, expected: tuple[int, int]
) -> None:
    img = fit(np.zeros((h, w), dtype=np.uint8), 336)
    assert img.size == expected


def test_png_bytes_converts_other_modes() -> None:
    img = Image.new("P", (3, 2), 1)
    assert png_array(png_bytes(img)).shape == (2, 3, 3)


def test_montage_grid_and_labels() -> None:
    tiles = [Image.new("L", (100, 80), v) for v in (10, 60, 110, 160, 210)]
    sheet = montage(tiles, ["1/5", "2/5", "3/5", "4/5", "5/5"], 336)
    assert sheet.size == (336, 224)  # 3 x 2 cells of 112 px, longest side max_side
    arr = np.asarray(sheet)
    assert arr[56, 56] == 10 and arr[56 + 112, 56 + 112] == 210  # centres of tiles 1 and 5
    assert arr[:14, :40].max() > 100  # label ink above the first tile
    with pytest.raises(ValueError, match="as many labels"):
        montage(tiles, ["x"], 336)
