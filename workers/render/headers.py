"""Header reading: files on disk become :class:`InstanceInput` rows without touching pixels."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from .model import InstanceInput, InstanceList

logger = logging.getLogger(__name__)

#: Media Storage Directory (DICOMDIR), PS3.10 7.2: an index, never an image.
_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"


def read_header(path: Path) -> Dataset:
    """Read a dataset without Pixel Data, tolerating files without preamble/File Meta (PS3.10 7.1).

    Raises :class:`ValueError` with a precise message when the file cannot be parsed.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return dcmread(path, stop_before_pixels=True, force=True)
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"unreadable DICOM header ({type(err).__name__}: {err})") from err


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def _int_or_none(value: Any, keyword: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"invalid {keyword} {str(value)!r} (not an integer)") from err


def _floats(value: Any, count: int, keyword: str) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        items = tuple(float(v) for v in value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"invalid {keyword} (not {count} decimal numbers)") from err
    if len(items) != count:
        return None
    return items


def instance_from_dataset(ds: Dataset, path: Path) -> InstanceInput:
    """Map a header to the fields the listener's index stores (PS3.3 C.7.3.1, C.7.6.1, C.7.6.2)."""
    media_class = ""
    if hasattr(ds, "file_meta"):
        media_class = str(ds.file_meta.get("MediaStorageSOPClassUID", "") or "")
    if media_class == _DICOMDIR_SOP_CLASS or "DirectoryRecordSequence" in ds:
        raise ValueError("DICOMDIR (Media Storage Directory), not a composite instance")
    sop_instance_uid = _text(ds, "SOPInstanceUID")
    series_uid = _text(ds, "SeriesInstanceUID")
    sop_class = _text(ds, "SOPClassUID") or media_class
    if not sop_instance_uid or not series_uid or not sop_class:
        missing = [
            name
            for name, value in (
                ("SOPInstanceUID", sop_instance_uid),
                ("SeriesInstanceUID", series_uid),
                ("SOPClassUID", sop_class),
            )
            if not value
        ]
        raise ValueError(f"not a composite instance: missing {', '.join(missing)}")
    frames = _int_or_none(ds.get("NumberOfFrames"), "Number of Frames (0028,0008)")
    ipp = _floats(ds.get("ImagePositionPatient"), 3, "Image Position (Patient)")
    iop = _floats(ds.get("ImageOrientationPatient"), 6, "Image Orientation (Patient)")
    image_type = ds.get("ImageType")
    if image_type is None:
        types: tuple[str, ...] = ()
    elif isinstance(image_type, str):
        types = (image_type.strip().upper(),)
    else:
        types = tuple(str(v).strip().upper() for v in image_type)
    return InstanceInput(
        path=path,
        sop_instance_uid=sop_instance_uid,
        sop_class_uid=sop_class,
        series_instance_uid=series_uid,
        modality=_text(ds, "Modality").upper(),
        body_part=_text(ds, "BodyPartExamined").upper(),
        series_description=_text(ds, "SeriesDescription"),
        series_number=_int_or_none(ds.get("SeriesNumber"), "Series Number (0020,0011)"),
        image_type=types,
        instance_number=_int_or_none(ds.get("InstanceNumber"), "Instance Number (0020,0013)"),
        number_of_frames=max(frames or 1, 1),
        rows=_int_or_none(ds.get("Rows"), "Rows (0028,0010)"),
        columns=_int_or_none(ds.get("Columns"), "Columns (0028,0011)"),
        image_position_patient=ipp,  # type: ignore[arg-type]
        image_orientation_patient=iop,  # type: ignore[arg-type]
    )


def instances_from_files(paths: Iterable[Path | str]) -> InstanceList:
    """Read the headers of ``paths`` (``stop_before_pixels``) into :class:`InstanceInput` rows.

    Unreadable files and files that are not composite instances (DICOMDIR, garbage) are skipped;
    each is recorded in the returned list's ``skipped`` attribute with the reason.
    """
    result = InstanceList()
    for raw in paths:
        path = Path(raw)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # invalid VRs are reported by pydicom's logger
                result.append(instance_from_dataset(read_header(path), path))
        except ValueError as err:
            result.skipped.append((path, str(err)))
            logger.info("skipped file %s: %s", path.name, err)
    return result


def sort_paths(paths: Sequence[Path]) -> list[Path]:
    """Sorted regular files under the given files or folders (helper for CLI and tests)."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out.extend(sorted(q for q in p.rglob("*") if q.is_file()))
        elif p.is_file():
            out.append(p)
    return out
