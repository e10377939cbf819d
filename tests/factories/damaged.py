"""Real corpus files with one defect each, made by rewriting their bytes: what a hostile peer or
a careless vendor sends (issue 11). Every builder starts from a public file of tests/data/dicom
and changes only what its name says; the rest stays the real encoding."""

from __future__ import annotations

import struct
from pathlib import Path

from pydicom import dcmread


def _explicit_element(raw: bytes, group: int, elem: int, vr: bytes) -> int:
    """Offset of an explicit VR little endian element header (tag + VR) in ``raw``."""
    at = raw.find(struct.pack("<HH", group, elem) + vr, 132)
    assert at > 0, f"({group:04X},{elem:04X}) {vr!r} not found"
    return at


def without_sop_instance_uid(src: Path, out: Path) -> Path:
    """The data set without (0008,0018); the file meta (what a sender announces) keeps it."""
    ds = dcmread(src)
    del ds.SOPInstanceUID
    ds.save_as(out, enforce_file_format=False)
    assert "SOPInstanceUID" not in dcmread(out) and dcmread(out).file_meta.MediaStorageSOPInstanceUID
    return out


def short_native_pixel_data(src: Path, out: Path) -> Path:
    """Native Pixel Data cut to half its declared size, its element length saying so: a file
    that is complete as a file but whose pixels are fewer than Rows x Columns x bits."""
    ds = dcmread(src)
    half = len(ds.PixelData) // 2
    ds.PixelData = ds.PixelData[: half + half % 2]
    ds.save_as(out, enforce_file_format=False)
    return out


def odd_length_us(src: Path, out: Path, group: int, elem: int) -> Path:
    """A US element (explicit VR little endian) whose value is 3 bytes long."""
    raw = src.read_bytes()
    at = _explicit_element(raw, group, elem, b"US")
    (length,) = struct.unpack("<H", raw[at + 6:at + 8])
    assert length == 2
    out.write_bytes(raw[:at + 6] + struct.pack("<H", 3) + raw[at + 8:at + 10] + b"\x00" + raw[at + 10:])
    return out


def length_swallowing(src: Path, out: Path, group: int, elem: int, vr: bytes, swallow: int) -> Path:
    """A 16-bit length element whose length grows by ``swallow`` bytes: its value then covers the
    elements after it (a broken length, one of the commonest damages)."""
    raw = bytearray(src.read_bytes())
    at = _explicit_element(bytes(raw), group, elem, vr)
    (length,) = struct.unpack("<H", raw[at + 6:at + 8])
    raw[at + 6:at + 8] = struct.pack("<H", length + swallow)
    out.write_bytes(bytes(raw))
    return out


def vendor_quirks(src: Path, out: Path, *, group: int, elem: int, vr: bytes, unusual_vr: bytes) -> Path:
    """A file as some vendors write it: a File Meta Information Group Length that does not match
    the meta elements (PS3.10 7.1), and one data set element written with a VR that is no DICOM
    VR (explicit, 16-bit length). pydicom reads it and decodes its pixels."""
    raw = bytearray(src.read_bytes())
    assert raw[132:140] == b"\x02\x00\x00\x00UL\x04\x00"
    (group_length,) = struct.unpack("<L", raw[140:144])
    raw[140:144] = struct.pack("<L", group_length + 20)
    at = _explicit_element(bytes(raw), group, elem, vr)
    raw[at + 4:at + 6] = unusual_vr
    out.write_bytes(bytes(raw))
    return out
