"""Benchmark: key images of a 300-slice CT study, header-driven versus decoding every slice.

Run with::

    .venv/bin/python bench/render.py            # add --slices N / --keep to change size / keep files

It writes a synthetic 300-slice CT series (512 x 512, 16-bit signed, realistic Image Position
(Patient) along z with shuffled Instance Numbers, and the full header of a real CT slice of the
corpus) with pydicom to /dev/shm (or a temp dir), then times three paths on one core, all in the
same run:

* pipeline:    render_study over prebuilt InstanceInputs (what the worker does with index rows)
* from files:  instances_from_files (headers only) + render_study
* baseline:    decode every slice (dcmread + pixel_array), order by position, render the same
               slices with the same windows

Target: pipeline under 0.5 s and at least 20x faster than the baseline.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os

# one core: every path below is single-threaded Python/numpy/Pillow; keep any BLAS pool at one thread
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from workers.render import instances_from_files, render_study
from workers.render.encode import fit, png_bytes
from workers.render.geometry import pick_representatives, slice_normal
from workers.render.pixels import CT_WINDOWS, to_display
from workers.render_config import RenderSettings

#: A real CT slice (GE, from TCIA via dcmqi) whose header every generated slice copies.
TEMPLATE = (
    Path(__file__).resolve().parent.parent / "tests/data/dicom/ct/series_dcmqi_ct3slice/01.dcm"
)


def phantom(n: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """A chest-like slice in stored values (HU + 1024): body ellipse, two lungs, spine, noise."""
    y, x = np.mgrid[0:512, 0:512]
    hu = np.full((512, 512), -1000.0)
    body = ((x - 256) / 220) ** 2 + ((y - 256) / 170) ** 2 < 1
    hu[body] = 40
    z = n / max(count - 1, 1)
    lung_r = 70 + 30 * np.sin(np.pi * z)
    for cx in (170, 342):
        hu[((x - cx) / (lung_r * 0.8)) ** 2 + ((y - 240) / lung_r) ** 2 < 1] = -850
    hu[(x - 256) ** 2 + (y - 380) ** 2 < 30**2] = 700
    hu += rng.normal(0, 12, size=hu.shape)
    return np.clip(hu + 1024, 0, 4095).astype(np.int16)


def write_series(folder: Path, count: int) -> list[Path]:
    """Write ``count`` CT slices (2.5 mm apart, Instance Numbers shuffled) into ``folder``.

    Every slice carries the full header of a real GE CT slice of the corpus (``TEMPLATE``, about
    110 elements, as real scanners write), with new UIDs, geometry, rescale and pixels.
    """
    rng = np.random.default_rng(7)
    template = dcmread(TEMPLATE, stop_before_pixels=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    numbers = rng.permutation(count) + 1
    paths = []
    for n in range(count):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = copy.deepcopy(template)
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.BodyPartExamined, ds.SeriesDescription = "CT", "CHEST", "Thorax 2.5mm"
        ds.PatientName, ds.PatientID = "Bench^Phantom", "BENCH"
        ds.SeriesNumber, ds.InstanceNumber = 2, int(numbers[n])
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [-250.0, -250.0, -100.0 - 2.5 * n]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceLocation = -100.0 - 2.5 * n
        ds.PixelSpacing = [0.9765625, 0.9765625]
        ds.SliceThickness = 2.5
        ds.Rows = ds.Columns = 512
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.WindowCenter, ds.WindowWidth = 40, 400
        ds.PixelData = phantom(n, count, rng).tobytes()
        path = folder / f"slice{n:04d}.dcm"
        ds.save_as(path, enforce_file_format=True, implicit_vr=False, little_endian=True)
        paths.append(path)
    return paths


def baseline(paths: list[Path], settings: RenderSettings) -> list[bytes]:
    """Decode every slice, order by position, render the same representative slices and windows."""
    slices = []
    for p in paths:
        ds = dcmread(p)
        arr = ds.pixel_array
        pos = float(
            np.dot(
                slice_normal([float(v) for v in ds.ImageOrientationPatient]),
                [float(v) for v in ds.ImagePositionPatient],
            )
        )
        slices.append((pos, ds, arr))
    slices.sort(key=lambda s: s[0])
    picks = pick_representatives([s[0] for s in slices], settings.slices_per_volume)
    out = []
    for i in picks:
        _, ds, arr = slices[i]
        out.append(
            png_bytes(
                fit(to_display(arr, ds, 0, CT_WINDOWS["soft tissue"]).pixels, settings.max_side)
            )
        )
    _, ds, arr = slices[picks[len(picks) // 2]]
    out.append(png_bytes(fit(to_display(arr, ds, 0, CT_WINDOWS["lung"]).pixels, settings.max_side)))
    return out


def best_of(repeats: int, fn: Callable[[], object]) -> tuple[float, float]:
    """Best wall time and best CPU time of ``repeats`` runs, garbage collector off (as timeit does).

    CPU time (``time.process_time``, this single-threaded process only) is reported beside wall
    time because shared machines preempt short runs; both are best-of-N for every path.
    """
    walls, cpus = [], []
    for _ in range(repeats):
        gc.collect()
        gc.disable()
        try:
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            cpus.append(time.process_time() - c0)
            walls.append(time.perf_counter() - w0)
        finally:
            gc.enable()
    return min(walls), min(cpus)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=7, help="best of N runs, each path")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    args = parser.parse_args()
    root = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    folder = Path(tempfile.mkdtemp(prefix="taqrir-bench-", dir=root))
    try:
        t0 = time.perf_counter()
        paths = write_series(folder, args.slices)
        print(
            f"wrote {len(paths)} slices of 512x512 int16 to {folder} in {time.perf_counter() - t0:.1f} s"
        )
        settings = RenderSettings()
        prebuilt = instances_from_files(paths)  # stands in for the listener's index rows
        rendered = render_study(prebuilt, settings)
        base_png = baseline(paths, settings)
        same = [k.png for k in rendered.key_images] == base_png
        pipe = best_of(args.repeats, lambda: render_study(prebuilt, settings))
        files = best_of(args.repeats, lambda: render_study(instances_from_files(paths), settings))
        base = best_of(args.repeats, lambda: baseline(paths, settings))
        labels = ", ".join(k.label for k in rendered.key_images[:2])
        print(f"key images: {len(rendered.key_images)} ({labels}, ...)")
        print(f"same PNG bytes as the baseline: {same}")
        print(f"{'best of ' + str(args.repeats):38s} {'wall ms':>9s} {'cpu ms':>9s}")
        for name, (wall, cpu) in (
            ("pipeline (prebuilt InstanceInputs)", pipe),
            ("from files (headers + render)", files),
            ("baseline (decode every slice)", base),
        ):
            print(f"{name:38s} {wall * 1000:9.1f} {cpu * 1000:9.1f}")
        print(
            f"{'ratio baseline / pipeline':38s} {base[0] / pipe[0]:8.1f}x {base[1] / pipe[1]:8.1f}x   (target >= 20x)"
        )
        print(
            f"{'ratio baseline / from files':38s} {base[0] / files[0]:8.1f}x {base[1] / files[1]:8.1f}x"
        )
        print(f"pipeline under 0.5 s: {pipe[0] < 0.5}")
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
