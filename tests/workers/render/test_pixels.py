"""Display pipeline on real corpus files: LUTs, windows, polarity, colour spaces, endianness."""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread, dcmwrite
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import generate_frames
from pydicom.pixels import pixel_array
from pydicom.uid import ImplicitVRLittleEndian

from workers.render import instances_from_files, render_study
from workers.render.errors import SeriesRenderError
from workers.render.pixels import (
    CT_WINDOWS,
    Window,
    frame_dataset,
    modality_values,
    read_frames,
    to_display,
)
from workers.render_config import RenderSettings

from .conftest import png_array

File = Callable[[str], Path]


def display(path: Path, frame: int = 0, window: Window | None = None) -> np.ndarray:
    ds, frames = read_frames(path, [frame])
    return to_display(frames[frame], ds, frame, window).pixels


def single_png(path: Path, settings: RenderSettings | None = None) -> np.ndarray:
    rendered = render_study(instances_from_files([path]), settings or RenderSettings())
    return png_array(rendered.key_images[0].png)


def reference_frame(path: Path, frame: int = 0) -> np.ndarray:
    """The frame decoded by Pillow straight from the encapsulated codestream (another decoder)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = dcmread(path)
    data = list(
        generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames", 1) or 1))
    )[frame]
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


# --- polarity -----------------------------------------------------------------------------------


def _regions(img: np.ndarray) -> tuple[float, float]:
    """Mean grey of the mediastinum (centre) and of both lung fields of a PA chest image."""
    h, w = img.shape[:2]
    centre = img[int(0.35 * h) : int(0.6 * h), int(0.46 * w) : int(0.54 * w)]
    left = img[int(0.3 * h) : int(0.55 * h), int(0.2 * w) : int(0.35 * w)]
    right = img[int(0.3 * h) : int(0.55 * h), int(0.65 * w) : int(0.8 * w)]
    return float(centre.mean()), float((left.mean() + right.mean()) / 2)


@pytest.mark.parametrize(
    "rel", ["cr_dx/fodicom_CR-MONO1-10-chest.dcm", "cr_dx/wg04_RG1_chest_PA/RG1_JLSN.dcm"]
)
def test_monochrome1_chest_shows_mediastinum_brighter_than_lungs(
    corpus_file: File, rel: str
) -> None:
    img = single_png(corpus_file(rel))
    mediastinum, lungs = _regions(img)
    assert mediastinum > lungs + 40, (mediastinum, lungs)


def test_monochrome1_renders_like_the_same_image_stored_monochrome2(
    corpus_file: File, tmp_path: Path
) -> None:
    src = corpus_file("cr_dx/fodicom_CR-MONO1-10-chest.dcm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = dcmread(src, force=True)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    arr = pixel_array(ds)
    top = 2 ** int(ds.BitsStored) - 1
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = (top - arr.astype(np.int32)).astype(arr.dtype).tobytes()
    ds.WindowCenter = top - float(ds.WindowCenter)
    mono2 = tmp_path / "mono2.dcm"
    ds.save_as(mono2, enforce_file_format=True)
    a = display(src).astype(int)
    b = display(mono2).astype(int)
    assert np.abs(a - b).max() <= 1
    mediastinum, lungs = _regions(b)
    assert mediastinum > lungs + 40


def test_presentation_lut_shape_inverse_with_monochrome1_inverts_once(corpus_file: File) -> None:
    path = corpus_file("cr_dx/highdicom_dx_image.dcm")
    ds, frames = read_frames(path, [0])
    assert ds.PhotometricInterpretation == "MONOCHROME1" and ds.PresentationLUTShape == "INVERSE"
    shown = to_display(frames[0], ds, 0).pixels.astype(int)
    raw = frames[0].astype(int)
    # windowed (C128/W256 over 8-bit values) and inverted exactly once: higher stored, darker shown
    assert np.corrcoef(shown.ravel(), raw.ravel())[0, 1] < -0.99


# --- CT windows in Hounsfield units -------------------------------------------------------------


def _expected_grey(hu: np.ndarray, window: Window) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 linear window to 0..255, computed here independently."""
    c, w = window.center - 0.5, window.width - 1
    y = ((hu - c) / w + 0.5) * 255
    return np.clip(np.rint(y), 0, 255)


@pytest.mark.parametrize("name", ["soft tissue", "lung", "bone", "brain"])
def test_ct_window_maps_hounsfield_units_to_expected_grey(corpus_file: File, name: str) -> None:
    path = corpus_file("ct/wg04_CT1/CT1_UNC.dcm")
    ds = dcmread(path)
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    window = CT_WINDOWS[name]
    shown = display(path, window=window).astype(np.float64)
    assert np.abs(shown - _expected_grey(hu, window)).max() <= 1
    low = window.center - window.width / 2
    high = window.center + window.width / 2
    assert (shown[hu <= low] == 0).all()
    assert (shown[hu > high] == 255).all()
    at_centre = np.abs(hu - window.center) < 0.5
    if at_centre.any():
        assert np.abs(shown[at_centre] - 127.5).max() <= 1 + 255 / (window.width - 1)


def test_ct_key_image_grey_at_known_hounsfield_regions(corpus_file: File) -> None:
    """In the PNG itself: air outside the body is black, a soft-tissue block is mid grey."""
    path = corpus_file("ct/wg04_CT1/CT1_UNC.dcm")
    ds = dcmread(path)
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    rendered = render_study(instances_from_files([path]), RenderSettings())
    soft = rendered.key_images[0]
    assert soft.window == "C40/W400 soft tissue"
    png = png_array(soft.png).astype(np.float64)
    scale = png.shape[0] / hu.shape[0]
    # the most homogeneous 24 x 24 block of soft tissue (mean 0..100 HU, inside the window)
    best: tuple[float, int, int] | None = None
    for r in range(0, 512 - 24, 8):
        for c in range(0, 512 - 24, 8):
            block = hu[r : r + 24, c : c + 24]
            tissue = 0 < block.mean() < 100 and block.min() > -150 and block.max() < 230
            if tissue and (best is None or block.std() < best[0]):
                best = (float(block.std()), r, c)
    assert best is not None
    _, r, c = best
    expected = _expected_grey(hu[r + 4 : r + 20, c + 4 : c + 20], CT_WINDOWS["soft tissue"]).mean()
    pr0, pr1 = int(np.ceil((r + 4) * scale)), int((r + 20) * scale)
    pc0, pc1 = int(np.ceil((c + 4) * scale)), int((c + 20) * scale)
    grey = png[pr0:pr1, pc0:pc1].mean()
    assert 60 < expected < 200
    assert abs(grey - expected) <= 4
    assert png[:8, :8].max() == 0  # air (-1000 HU and padding) in the corner


# --- modality and VOI LUT sequences -----------------------------------------------------------


def test_modality_lut_sequence_is_applied(corpus_file: File) -> None:
    path = corpus_file("cr_dx/fodicom_CR-ModalitySequenceLUT.dcm")
    ds, frames = read_frames(path, [0])
    item = ds.ModalityLUTSequence[0]
    entries, first, _ = (int(v) for v in item.LUTDescriptor)
    data = item.LUTData
    lut = (
        np.frombuffer(data, dtype="<u2") if isinstance(data, bytes) else np.asarray(data)
    ).astype(np.int64)
    expected = lut[np.clip(frames[0].astype(np.int64) - first, 0, (entries or 65536) - 1)]
    assert np.array_equal(modality_values(frames[0], frame_dataset(ds, 0)), expected)


def test_voi_lut_sequence_is_preferred_to_auto_window(corpus_file: File) -> None:
    path = corpus_file("mg/fodicom_GH133_mammo.dcm")
    ds, frames = read_frames(path, [0])
    shown = to_display(frames[0], ds, 0)
    assert shown.window == "VOI LUT (header)"
    item = ds.VOILUTSequence[0]
    entries, first, _ = (int(v) for v in item.LUTDescriptor)
    lut = np.asarray(item.LUTData, dtype=np.float64)
    mapped = lut[np.clip(frames[0].astype(np.int64) - first, 0, (entries or 65536) - 1)]
    expected = np.clip(np.rint(mapped * 255.0 / lut[: frames[0].max() - first + 1].max()), 0, 255)
    assert np.abs(shown.pixels.astype(np.float64) - expected).max() <= 1


def test_enhanced_frames_take_rescale_and_window_from_functional_groups(corpus_file: File) -> None:
    path = corpus_file("mr/fodicom_MOVEKNEE_enhanced.dcm")
    ds, frames = read_frames(path, [5])
    voi = ds.PerFrameFunctionalGroupsSequence[5].FrameVOILUTSequence[0]
    assert (
        to_display(frames[5], ds, 5).window
        == f"C{float(voi.WindowCenter):g}/W{float(voi.WindowWidth):g} header"
    )
    ct, _ = read_frames(corpus_file("ct/pydicom-data_eCT_Supplemental.dcm"), [0])
    assert "RescaleIntercept" not in ct
    assert float(frame_dataset(ct, 0).RescaleIntercept) == -1024.0


# --- colour -------------------------------------------------------------------------------------


def _ybr_full_to_rgb(ybr: np.ndarray) -> np.ndarray:
    """PS3.3 C.7.6.3.1.2 YBR_FULL to RGB, written out here as the test oracle."""
    y, cb, cr = (ybr[..., i].astype(np.float64) for i in range(3))
    rgb = np.stack(
        [
            y + 1.402 * (cr - 128),
            y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
            y + 1.772 * (cb - 128),
        ],
        axis=-1,
    )
    return np.clip(np.rint(rgb), 0, 255)


def test_ybr_full_rle_matches_the_converted_reference(corpus_file: File) -> None:
    path = corpus_file("us/dcm4che_YBR_FULL-RLE_thyroid.dcm")
    ybr = pixel_array(str(path), raw=True)
    assert np.abs(display(path).astype(np.float64) - _ybr_full_to_rgb(ybr)).max() <= 1


@pytest.mark.parametrize(
    ("rel", "frame"),
    [
        ("us/pylibjpeg-data_JPEGExtended_3s_US.dcm", 0),  # YBR_FULL, JPEG
        ("us/fodicom_DIRW0007_echo_cine.dcm", 3),  # YBR_FULL_422, JPEG baseline cine
        ("vl_pathology/wg04_VL6_J2KR.dcm", 0),  # YBR_RCT, JPEG 2000 lossless
        ("vl_pathology/wg04_VL4_J2KI.dcm", 0),  # YBR_ICT, JPEG 2000
    ],
)
def test_ybr_images_match_rgb_decoded_by_another_decoder(
    corpus_file: File, rel: str, frame: int
) -> None:
    path = corpus_file(rel)
    ours = display(path, frame).astype(int)
    ref = reference_frame(path, frame).astype(int)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= 2


def test_rgb_jpeg_without_colour_transform_is_not_converted(corpus_file: File) -> None:
    """Photometric RGB is honoured: the TCGA tile is near-neutral glass, not magenta."""
    shown = display(corpus_file("vl_pathology/pydicom_SC_jpeg_no_color_transform_TCGA_tile.dcm"))
    r, g, b = (float(shown[..., i].mean()) for i in range(3))
    assert min(r, g, b) > 200 and max(r, g, b) - min(r, g, b) < 15


def test_palette_colour_matches_independent_lookup_and_both_encodings(corpus_file: File) -> None:
    rle = corpus_file("us/dcm4che_US-PAL-8-10x-echo.dcm")
    jls = corpus_file("us/dcm4che_jpeg-ls-Palette.dcm")
    ds, frames = read_frames(rle, [4])
    index = frames[4].astype(np.int64)
    channels = []
    for colour in ("Red", "Green", "Blue"):
        entries, first, bits = (
            int(v) for v in ds[f"{colour}PaletteColorLookupTableDescriptor"].value
        )
        data = np.frombuffer(
            ds[f"{colour}PaletteColorLookupTableData"].value, dtype="<u2" if bits > 8 else "u1"
        )
        values = data[np.clip(index - first, 0, (entries or 65536) - 1)].astype(np.int64)
        channels.append(values >> 8 if bits > 8 and values.max() > 255 else values)
    expected = np.stack(channels, axis=-1)
    shown = to_display(frames[4], ds, 4).pixels
    assert shown.shape == (*index.shape, 3)
    assert np.array_equal(shown, expected)
    for f in (0, 4, 9):
        assert np.array_equal(display(rle, f), display(jls, f))


# --- encodings of one image render identically ---------------------------------------------


@pytest.mark.parametrize(
    "group",
    [
        [
            "ct/wg04_CT1/CT1_UNC.dcm",
            "ct/wg04_CT1/CT1_J2KR.dcm",
            "ct/wg04_CT1/CT1_JLSL.dcm",
            "ct/wg04_CT1/CT1_JPLL.dcm",
            "ct/wg04_CT1/CT1_RLE.dcm",
            "ct/fodicom_D_CLUNIE_CT1_RLE_FRAGS.dcm",
        ],
        [
            "mr/pydicom_MR_small/MR_small.dcm",
            "mr/pydicom_MR_small/MR_small_bigendian.dcm",
            "mr/pydicom_MR_small/MR_small_implicit.dcm",
            "mr/pydicom_MR_small/MR_small_RLE.dcm",
            "mr/pydicom_MR_small/MR_small_jp2klossless.dcm",
            "mr/pydicom_MR_small/MR_small_jpeg_ls_lossless.dcm",
            "mr/pydicom_MR_small/MR_small_padded.dcm",
        ],
        [
            "mr/pydicom-data_emri_small/emri_small.dcm",
            "mr/pydicom-data_emri_small/emri_small_big_endian.dcm",
            "mr/pydicom-data_emri_small/emri_small_RLE.dcm",
            "mr/pydicom-data_emri_small/emri_small_jpeg_2k_lossless.dcm",
            "mr/pydicom-data_emri_small/emri_small_jpeg_ls_lossless.dcm",
        ],
    ],
    ids=[
        "CT1 lossless syntaxes",
        "MR_small endianness and codecs",
        "enhanced MR endianness and codecs",
    ],
)
def test_lossless_encodings_and_endianness_render_identically(
    corpus_file: File, group: list[str]
) -> None:
    digests = set()
    for rel in group:
        rendered = render_study(instances_from_files([corpus_file(rel)]), RenderSettings())
        digests.add(tuple(k.sha256 for k in rendered.key_images))
    assert len(digests) == 1


def test_signed_12_bit_ct_keeps_negative_values(corpus_file: File) -> None:
    ds, frames = read_frames(corpus_file("ct/pydicom_CT_small.dcm"), [0])
    assert int(ds.PixelRepresentation) == 1
    hu = modality_values(frames[0], frame_dataset(ds, 0))
    assert hu.min() < -500 < 0 < hu.max()


def test_htj2k_rgb_decodes(corpus_file: File) -> None:
    """HTJ2K (pylibjpeg only): the file lacks a Series Instance UID, so it is decoded directly."""
    shown = display(corpus_file("other/pydicom-data_HTJ2KLossless_08_RGB.dcm"))
    assert shown.shape == (480, 640, 3) and shown.std() > 20


def test_undecodable_pixel_data_raises_a_precise_error(corpus_file: File) -> None:
    with pytest.raises(SeriesRenderError, match=r"1\.2\.840\.10008\.1\.2\.4\.111"):
        read_frames(corpus_file("malformed/dcm4che_will-jxl.dcm"), [0])
    with pytest.raises(SeriesRenderError, match="cannot decode pixel data"):
        read_frames(corpus_file("malformed/wg04_MR1_JPLY.dcm"), [0])


def test_planar_big_endian_rgb_equals_its_interleaved_little_endian_rewrite(
    corpus_file: File, tmp_path: Path
) -> None:
    """US-RGB-8-epicard: Planar Configuration 1, Explicit VR Big Endian."""
    src = corpus_file("us/dcm4che_US-RGB-8-epicard.dcm")
    ds = dcmread(src)
    assert ds.PlanarConfiguration == 1 and not ds.original_encoding[1]
    raw = np.frombuffer(ds.PixelData, dtype=np.uint8).reshape(3, ds.Rows, ds.Columns)
    ds.PixelData = np.ascontiguousarray(raw.transpose(1, 2, 0)).tobytes()  # R,G,B interleaved
    ds.PlanarConfiguration = 0
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    rewrite = tmp_path / "interleaved_le.dcm"
    dcmwrite(rewrite, ds, implicit_vr=False, little_endian=True, force_encoding=True)
    original = display(src)
    assert np.array_equal(original, display(rewrite))
    assert np.array_equal(original, np.ascontiguousarray(raw.transpose(1, 2, 0)))
