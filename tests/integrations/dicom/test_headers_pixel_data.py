"""The Pixel Data checks on their own (:mod:`integrations.dicom.pixel_data`): the extent against the
file's end, and the length against the Image Pixel Module (PS3.5 8.1.1, PS3.3 C.7.6.3)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from pydicom import dcmread

from integrations.dicom.errors import CannotUnderstand
from integrations.dicom.pixel_data import check_pixel_extent, check_pixel_length

CORPUS = Path(__file__).resolve().parents[2] / "data" / "dicom"


def _pixel_at(data: bytes) -> int:
    with io.BytesIO(data) as f:
        dcmread(f, stop_before_pixels=True)
        return f.tell()


def test_native_pixel_data_extent_is_its_length_and_a_cut_is_refused() -> None:
    data = (CORPUS / "ct" / "pydicom_CT_small.dcm").read_bytes()
    ds = dcmread(io.BytesIO(data))
    at = _pixel_at(data)
    f = io.BytesIO(data)
    f.seek(at)
    length = check_pixel_extent(f, transfer_syntax_uid=ds.file_meta.TransferSyntaxUID, file_size=len(data))
    assert length is not None and length == len(ds.PixelData) == ds.Rows * ds.Columns * 2
    cut = data[:at + 12 + length - 10]  # (the file may hold elements after Pixel Data)
    f = io.BytesIO(cut)
    f.seek(at)
    with pytest.raises(CannotUnderstand, match="declares") as caught:
        check_pixel_extent(f, transfer_syntax_uid=ds.file_meta.TransferSyntaxUID, file_size=len(cut))
    assert caught.value.status == 0xC210


def test_encapsulated_pixel_data_is_walked_by_its_items() -> None:
    data = (CORPUS / "mr" / "dcm4che_MR-JPEGLosslessSV1.dcm").read_bytes()
    ds = dcmread(io.BytesIO(data), stop_before_pixels=True)
    at = _pixel_at(data)
    f = io.BytesIO(data)
    f.seek(at)
    assert check_pixel_extent(f, transfer_syntax_uid=ds.file_meta.TransferSyntaxUID, file_size=len(data)) is None
    f.seek(at)
    with pytest.raises(CannotUnderstand):
        check_pixel_extent(f, transfer_syntax_uid=ds.file_meta.TransferSyntaxUID, file_size=len(data) - 100)


def test_pixel_length_against_the_image_pixel_module() -> None:
    declared = {"rows": 4, "columns": 5, "bits_allocated": 16, "samples_per_pixel": 1, "number_of_frames": 2,
                "photometric_interpretation": "MONOCHROME2"}
    check_pixel_length(length=80, **declared)  # type: ignore[arg-type]
    check_pixel_length(length=82, **declared)  # type: ignore[arg-type]  # padding allowed
    with pytest.raises(CannotUnderstand, match="fewer than the 80"):
        check_pixel_length(length=79, **declared)  # type: ignore[arg-type]
    # bit-packed (Bits Allocated 1): 4 x 5 x 2 bits = 40 bits = 5 bytes
    check_pixel_length(length=5, **{**declared, "bits_allocated": 1})  # type: ignore[arg-type]
    with pytest.raises(CannotUnderstand):
        check_pixel_length(length=4, **{**declared, "bits_allocated": 1})  # type: ignore[arg-type]
    # YBR_FULL_422 holds two samples per pixel (PS3.3 C.7.6.3.1.2)
    ybr = {**declared, "bits_allocated": 8, "samples_per_pixel": 3, "photometric_interpretation": "YBR_FULL_422"}
    check_pixel_length(length=80, **ybr)  # type: ignore[arg-type]
    with pytest.raises(CannotUnderstand):
        check_pixel_length(length=79, **ybr)  # type: ignore[arg-type]
    # unreadable declarations and encapsulated data are not guessed at
    check_pixel_length(length=1, **{**declared, "rows": None})  # type: ignore[arg-type]
    check_pixel_length(length=None, **declared)  # type: ignore[arg-type]
