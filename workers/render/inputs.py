"""The renderer's input: the listener's index rows become :class:`InstanceInput` rows, in one place.

:func:`instance_input` is the one mapping from what the index stores (a series row and an
instance row, PS3.3 C.7.3.1 General Series, C.7.6.1 General Image, C.7.6.2 Image Plane, C.7.6.3
Image Pixel) to what :func:`~workers.render.study.render_study` reads. The pipeline
(``workers.service.instance_inputs``) calls it on the index's rows; :func:`instances_from_files`
calls it on the rows the index would store for files on disk (read by the listener's own header
extraction, :func:`integrations.dicom.headers.headers_from_dataset`), so that the render tests, the
benchmarks and the contact sheet exercise exactly the normalisation production runs.

The normalisation made here, and only here: Modality, Body Part Examined and Image Type values
are upper-cased and stripped (CS values are upper case, PS3.5 6.2; the rules compare them so),
Image Position/Orientation (Patient) are kept only with exactly 3 and 6 numbers, Number of Frames
is at least 1.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pydicom.dataset import FileMetaDataset

from integrations.dicom.errors import DicomInputError
from integrations.dicom.headers import InstanceHeaders, headers_from_dataset

from .headers import read_header
from .model import InstanceInput, InstanceList

logger = logging.getLogger(__name__)

#: Media Storage Directory (DICOMDIR), PS3.10 7.2: an index, never an image.
_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"


class IndexedSeries(Protocol):
    """The series columns of the index that rendering reads (``integrations.dicom.index.Series``)."""

    @property
    def series_instance_uid(self) -> str: ...
    @property
    def modality(self) -> str | None: ...
    @property
    def body_part(self) -> str | None: ...
    @property
    def description(self) -> str | None: ...
    @property
    def number(self) -> int | None: ...


class IndexedInstance(Protocol):
    """The instance columns of the index that rendering reads (``integrations.dicom.index.Instance``):
    Image Type as stored (values joined by backslashes), positions as JSON arrays."""

    @property
    def sop_instance_uid(self) -> str: ...
    @property
    def sop_class_uid(self) -> str: ...
    @property
    def image_type(self) -> str: ...
    @property
    def instance_number(self) -> int | None: ...
    @property
    def number_of_frames(self) -> int: ...
    @property
    def rows(self) -> int | None: ...
    @property
    def columns(self) -> int | None: ...
    @property
    def image_position_patient(self) -> str | None: ...
    @property
    def image_orientation_patient(self) -> str | None: ...


def _numbers(stored: str | None, count: int) -> tuple[float, ...] | None:
    if not stored:
        return None
    values = json.loads(stored)
    if not isinstance(values, list) or len(values) != count:
        return None
    return tuple(float(v) for v in values)


def instance_input(path: Path, series: IndexedSeries, instance: IndexedInstance) -> InstanceInput:
    """The renderer's view of one indexed instance whose file is at ``path``."""
    return InstanceInput(
        path=path,
        sop_instance_uid=instance.sop_instance_uid,
        sop_class_uid=instance.sop_class_uid,
        series_instance_uid=series.series_instance_uid,
        modality=(series.modality or "").strip().upper(),
        body_part=(series.body_part or "").strip().upper(),
        series_description=(series.description or "").strip(),
        series_number=series.number,
        image_type=tuple(v.strip().upper() for v in instance.image_type.split("\\") if v.strip()),
        instance_number=instance.instance_number,
        number_of_frames=max(instance.number_of_frames or 1, 1),
        rows=instance.rows,
        columns=instance.columns,
        image_position_patient=_numbers(instance.image_position_patient, 3),  # type: ignore[arg-type]
        image_orientation_patient=_numbers(instance.image_orientation_patient, 6),  # type: ignore[arg-type]
    )


@dataclass(frozen=True, slots=True)
class _FileSeries:
    series_instance_uid: str
    modality: str | None
    body_part: str | None
    description: str | None
    number: int | None


@dataclass(frozen=True, slots=True)
class _FileInstance:
    sop_instance_uid: str
    sop_class_uid: str
    image_type: str
    instance_number: int | None
    number_of_frames: int
    rows: int | None
    columns: int | None
    image_position_patient: str | None
    image_orientation_patient: str | None


def indexed_rows(headers: InstanceHeaders) -> tuple[IndexedSeries, IndexedInstance]:
    """The series and instance columns the index stores for ``headers`` (as
    ``integrations.dicom.index`` files them: Image Type joined by backslashes and cut to its
    column, positions as JSON)."""
    series = _FileSeries(headers.series_instance_uid, headers.modality, headers.body_part,
                         headers.series_description, headers.series_number)
    instance = _FileInstance(
        sop_instance_uid=headers.sop_instance_uid,
        sop_class_uid=headers.sop_class_uid,
        image_type="\\".join(headers.image_type)[:256],
        instance_number=headers.instance_number,
        number_of_frames=headers.number_of_frames,
        rows=headers.rows,
        columns=headers.columns,
        image_position_patient=json.dumps(headers.image_position_patient) if headers.image_position_patient else None,
        image_orientation_patient=(json.dumps(headers.image_orientation_patient)
                                   if headers.image_orientation_patient else None),
    )
    return series, instance


def instances_from_files(paths: Iterable[Path | str]) -> InstanceList:
    """Read the headers of ``paths`` (``stop_before_pixels``) into :class:`InstanceInput` rows,
    through the listener's header extraction and :func:`instance_input`.

    Files are read tolerantly (without preamble or File Meta too: test data and archives hold
    such files, PS3.10 7.1). Unreadable files and files the listener would not index (DICOMDIR,
    garbage, missing or invalid UIDs) are skipped; each is recorded in the returned list's
    ``skipped`` attribute with the reason.
    """
    result = InstanceList()
    for raw in paths:
        path = Path(raw)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # invalid VRs are reported by pydicom's logger
                ds = read_header(path)
                meta = getattr(ds, "file_meta", None)
                media_class = str(meta.get("MediaStorageSOPClassUID", "") or "") if meta is not None else ""
                if media_class == _DICOMDIR_SOP_CLASS or "DirectoryRecordSequence" in ds:
                    raise ValueError("DICOMDIR (Media Storage Directory), not a composite instance")
                ts = str(meta.get("TransferSyntaxUID", "") or "") if meta is not None else ""
                # A file's own File Meta is no C-STORE announcement: the listener checks the
                # announced UIDs against the data set and writes the File Meta anew (PS3.10 7.1).
                ds.file_meta = FileMetaDataset()
                headers = headers_from_dataset(ds, transfer_syntax_uid=ts)
        except (ValueError, DicomInputError) as err:
            reason = str(err) if isinstance(err, ValueError) else f"not indexable: {err}"
            result.skipped.append((path, reason))
            logger.info("skipped file %s: %s", path.name, reason)
            continue
        result.append(instance_input(path, *indexed_rows(headers)))
    return result
