"""Generated studies for tests and benchmarks (the corpus has no study of hundreds of slices)."""

from __future__ import annotations

import io
from datetime import datetime
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def make_ct_series(out_dir: Path, n: int, *, rows: int = 512, cols: int = 512, seed: int = 0,
                   patient_id: str = "BENCH001", study_uid: str | None = None) -> list[Path]:
    """Write an axial CT series of ``n`` 16-bit slices (a water cylinder with bone and air) with
    real geometry (Image Position/Orientation Patient), one file per slice."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    yy, xx = np.mgrid[0:rows, 0:cols]
    r = np.hypot(yy - rows / 2, xx - cols / 2)
    base = np.where(r < rows * 0.42, 1024 + 40, 0).astype(np.int16)  # soft tissue, HU 40
    base[r < rows * 0.08] = 1024 + 700  # bone
    base[(r > rows * 0.2) & (r < rows * 0.28) & (xx < cols / 2)] = 1024 - 800  # lung
    now = datetime(2026, 11, 27, 9, 30)
    paths = []
    for i in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.PatientID = patient_id
        ds.PatientName = "Test^Patient"
        ds.PatientSex = "F"
        ds.PatientAge = "054Y"
        ds.StudyDate = now.strftime("%Y%m%d")
        ds.StudyTime = now.strftime("%H%M%S")
        ds.AccessionNumber = f"ACC{seed:05d}"
        ds.StudyDescription = "CT CHEST WITH CONTRAST"
        ds.SeriesDescription = "AXIAL 1.0 SOFT"
        ds.Modality = "CT"
        ds.BodyPartExamined = "CHEST"
        ds.SeriesNumber = 2
        ds.InstanceNumber = i + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [-250.0, -250.0, -150.0 + i * 1.0]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [500 / cols, 500 / rows]
        ds.SliceThickness = 1.0
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.PixelRepresentation = 0
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.WindowCenter, ds.WindowWidth = 40, 400
        noise = rng.integers(0, 20, size=(rows, cols), dtype=np.int16)
        ds.PixelData = (base + noise).clip(0, 4095).astype(np.uint16).tobytes()
        path = out_dir / f"ct{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def corrected_resend(data: bytes) -> bytes:
    """The same SOP Instance as the file ``data`` with other pixel values (a corrected resend)."""
    ds = dcmread(io.BytesIO(data))
    pixels = bytearray(ds.PixelData)
    pixels[0] ^= 0xFF
    ds.PixelData = bytes(pixels)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()
