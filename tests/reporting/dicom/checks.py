"""Independent checks of written DICOM objects: dciodvfy (dicom3tools) and a pydicom read-back."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset


def write_and_read(ds: Dataset, path: Path) -> Dataset:
    """Write ``ds`` as a DICOM file and read it back (every object is checked as written)."""
    ds.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path)


def dciodvfy_errors(path: Path) -> list[str]:
    """The lines dciodvfy reports as errors (warnings are allowed)."""
    exe = shutil.which("dciodvfy")
    assert exe, "dciodvfy (Debian dicom3tools) is needed: apt-get install dicom3tools"
    proc = subprocess.run([exe, str(path)], check=False, capture_output=True, text=True, timeout=60)
    lines = (proc.stdout + proc.stderr).splitlines()
    return [line for line in lines if "Error" in line]
