"""Read what the index needs from a received instance: a pure function over a file.

:func:`read_headers` is the one header reader of the ingest path. It reads the file with the fast
walk (:mod:`.walk`) where that can answer, and with a full pydicom parse
(:func:`read_headers_pydicom`) otherwise; both answer the same (the tests compare them on the whole
corpus and on damaged copies of it), results and refusals (:class:`CannotUnderstand`,
:class:`IdentifiersMissing`) alike. :func:`headers_from_dataset` turns either reading into the
index's :class:`InstanceHeaders` (normalised and fitted to the index's columns), and
:mod:`.pixel_data` checks that the Pixel Data is all there.

Text is decoded by the dataset's Specific Character Set (PS3.5 6.1), Arabic ISO_IR 127 and UTF-8
ISO_IR 192 included; pydicom does the decoding, we only make sure every value is read through it:
``Dataset.__getitem__`` converts each raw element with its dataset's character set (a sequence
item inherits its parent's), so the full parse touching every element once decodes all text, and
a separate ``Dataset.decode()`` pass is not made. Only headers are parsed (``stop_before_pixels``):
a gigabyte slide costs no more than a CT slice. Dates and times are pydicom's DA and TM (PS3.5
6.2); a value they cannot read is left empty, never a reason to refuse the instance.
"""

from __future__ import annotations

import functools
import io
import os
import struct
from collections.abc import Mapping
from datetime import date, time
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict
from pydicom import dcmread
from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.tag import BaseTag
from pydicom.uid import ExplicitVRBigEndian, ImplicitVRLittleEndian
from pydicom.valuerep import DA, TM, VR

from .dimse import is_valid_uid
from .errors import CannotUnderstand, DicomInputError, IdentifiersMissing
from .pixel_data import check_pixel_extent, check_pixel_length
from .walk import META_KEYWORDS, NotWalkable, walk_header


class InstanceHeaders(BaseModel):
    """The header values of one instance that the study index keeps."""

    model_config = ConfigDict(frozen=True)

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    patient_id: str
    issuer_of_patient_id: str | None = None
    patient_name: str | None = None
    patient_sex: str | None = None
    patient_birth_date: date | None = None
    patient_age: str | None = None
    study_date: date | None = None
    study_time: time | None = None
    accession_number: str | None = None
    study_description: str | None = None
    referring_physician: str | None = None
    modality: str | None = None
    body_part: str | None = None
    series_description: str | None = None
    series_number: int | None = None
    instance_number: int | None = None
    image_type: tuple[str, ...] = ()
    number_of_frames: int = 1
    rows: int | None = None
    columns: int | None = None
    image_position_patient: tuple[float, float, float] | None = None
    image_orientation_patient: tuple[float, float, float, float, float, float] | None = None
    specific_character_set: str | None = None


class _Elements(Protocol):
    """What :func:`headers_from_dataset` reads: a pydicom ``Dataset`` or the fast path's values."""

    def get(self, key: str, default: Any = None) -> Any: ...


def _text(ds: _Elements, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = "\\".join(str(v) for v in value)
    # NUL is no character of any DICOM character repertoire (only UI padding, PS3.5 6.1.2.3 and
    # 9.1), and PostgreSQL text cannot hold it: dropped wherever it is, not only at the ends.
    text = str(value).replace("\x00", "").strip()
    return text or None


#: The index's integer columns are 32-bit (PostgreSQL INTEGER); an IS value may hold 12 digits.
_INT_RANGE = range(-(2**31), 2**31)


def _int(ds: _Elements, keyword: str) -> int | None:
    value = ds.get(keyword)
    try:
        out = int(value) if value not in (None, "") else None
    except (TypeError, ValueError, OverflowError):
        return None
    return out if out is None or out in _INT_RANGE else None


#: Identifying text the index matches on: longer than its column is refused (truncating would
#: file the instance under another identity). LO and SH hold at most 64 and 16 characters
#: (PS3.5 6.2); the columns hold 64.
_IDENTIFIER_LIMITS = {"patient_id": ("PatientID", 64), "issuer_of_patient_id": ("IssuerOfPatientID", 64),
                      "accession_number": ("AccessionNumber", 64)}
#: Descriptive text is cut to its column instead: a tolerant reader keeps the instance.
_TEXT_LIMITS = {"patient_name": 324, "patient_age": 8, "study_description": 256, "referring_physician": 324,
                "modality": 16, "body_part": 64, "series_description": 256, "specific_character_set": 128}


def _fit_columns(headers: InstanceHeaders) -> InstanceHeaders:
    """Refuse identifiers longer than the index holds; cut descriptive text to its column."""
    for field, (keyword, limit) in _IDENTIFIER_LIMITS.items():
        value = getattr(headers, field)
        if value is not None and len(value) > limit:
            raise CannotUnderstand(
                f"{keyword} is {len(value)} characters long, more than the {limit} its VR allows "
                "(PS3.5 6.2): the instance cannot be filed under it"
            )
    cut = {f: getattr(headers, f)[:n] for f, n in _TEXT_LIMITS.items()
           if getattr(headers, f) is not None and len(getattr(headers, f)) > n}
    return headers.model_copy(update=cut) if cut else headers


def _floats(ds: _Elements, keyword: str, n: int) -> tuple[float, ...] | None:
    value = ds.get(keyword)
    try:
        out = tuple(float(v) for v in value) if value is not None else None
    except (TypeError, ValueError):
        return None
    return out if out is not None and len(out) == n else None


@functools.lru_cache(maxsize=1024)
def _da(value: str | None) -> date | None:
    """A DA value (PS3.5 6.2: YYYYMMDD; pydicom also reads the ACR-NEMA YYYY.MM.DD) as a date;
    None where it is empty or not a date. Remembered: the instances of a study repeat their dates,
    and pydicom's DA (~2 us) would be most of the header extraction's cost after the walk."""
    if not value:
        return None
    try:
        parsed = DA(value)
    except ValueError:
        return None
    return date(parsed.year, parsed.month, parsed.day) if parsed is not None else None


@functools.lru_cache(maxsize=1024)
def _tm(value: str | None) -> time | None:
    """A TM value (PS3.5 6.2: HH[MM[SS[.F{1,6}]]]; the ACR-NEMA HH:MM:SS form read as well, as
    it always was here) as a time; None where it is empty or not a time. A leap second (60)
    becomes 59, as pydicom makes it. Remembered, as :func:`_da`."""
    if not value:
        return None
    try:
        parsed = TM(value.replace(":", ""))
    except ValueError:
        return None
    return time(parsed.hour, parsed.minute, parsed.second, parsed.microsecond) if parsed is not None else None


class UidMissing(IdentifiersMissing):
    """An identifying UID is absent from the data set (``keyword`` names it)."""

    def __init__(self, keyword: str, message: str) -> None:
        super().__init__(message)
        self.keyword = keyword


def _uid(ds: _Elements, keyword: str) -> str:
    value = ds.get(keyword)
    text = str(value).strip().rstrip("\x00").strip() if value else ""
    if not text:
        raise UidMissing(keyword, f"{keyword} is missing from the data set: the instance cannot be filed")
    if not is_valid_uid(text):
        raise IdentifiersMissing(f"{keyword} {text[:80]!r} is not a valid UID (PS3.5 9.1)")
    return text


def headers_from_dataset(ds: Dataset | _Elements, *, transfer_syntax_uid: str) -> InstanceHeaders:
    """Extract and validate the indexed values. Raises :class:`IdentifiersMissing` when the
    identifying UIDs are absent or invalid, :class:`CannotUnderstand` when values cannot be decoded."""
    # The data set must carry its own identity (SOP Common Module, PS3.3 C.12.1: both Type 1):
    # the UIDs of the C-STORE request and of the file meta are only announcements, and a data set
    # filed under an announced UID it does not carry would be drafted as something it may not be.
    meta = getattr(ds, "file_meta", None)
    sop_class = _uid(ds, "SOPClassUID")
    sop_instance = _uid(ds, "SOPInstanceUID")
    if meta is not None and meta.get("MediaStorageSOPInstanceUID") not in (None, "", sop_instance):
        raise IdentifiersMissing(
            f"SOP Instance UID in the dataset ({sop_instance}) differs from the one the sender "
            f"announced ({meta.get('MediaStorageSOPInstanceUID')})"
        )
    try:
        charset = ds.get("SpecificCharacterSet")
        image_type = ds.get("ImageType")
        headers = InstanceHeaders(
            sop_class_uid=sop_class,
            sop_instance_uid=sop_instance,
            study_instance_uid=_uid(ds, "StudyInstanceUID"),
            series_instance_uid=_uid(ds, "SeriesInstanceUID"),
            transfer_syntax_uid=transfer_syntax_uid,
            patient_id=_text(ds, "PatientID") or "",
            issuer_of_patient_id=_text(ds, "IssuerOfPatientID"),
            patient_name=_text(ds, "PatientName"),
            patient_sex=(_text(ds, "PatientSex") or "").upper()[:1] or None,
            patient_birth_date=_da(_text(ds, "PatientBirthDate")),
            patient_age=_text(ds, "PatientAge"),
            study_date=_da(_text(ds, "StudyDate")),
            study_time=_tm(_text(ds, "StudyTime")),
            accession_number=_text(ds, "AccessionNumber"),
            study_description=_text(ds, "StudyDescription"),
            referring_physician=_text(ds, "ReferringPhysicianName"),
            modality=_text(ds, "Modality"),
            body_part=_text(ds, "BodyPartExamined"),
            series_description=_text(ds, "SeriesDescription"),
            series_number=_int(ds, "SeriesNumber"),
            instance_number=_int(ds, "InstanceNumber"),
            image_type=tuple(str(v).strip() for v in image_type) if isinstance(image_type, (list, tuple)) or type(image_type).__name__ == "MultiValue" else ((str(image_type).strip(),) if image_type else ()),
            number_of_frames=max(_int(ds, "NumberOfFrames") or 1, 1),
            rows=_int(ds, "Rows"),
            columns=_int(ds, "Columns"),
            image_position_patient=_floats(ds, "ImagePositionPatient", 3),  # type: ignore[arg-type]
            image_orientation_patient=_floats(ds, "ImageOrientationPatient", 6),  # type: ignore[arg-type]
            specific_character_set="\\".join(charset) if isinstance(charset, (list, tuple)) or type(charset).__name__ == "MultiValue" else (str(charset) if charset else None),
        )
    except IdentifiersMissing:
        raise
    except (RecursionError, ValueError, TypeError, LookupError, AttributeError, OverflowError) as err:
        raise CannotUnderstand(f"header values cannot be decoded: {type(err).__name__}: {err}") from err
    if headers.patient_sex not in (None, "M", "F", "O"):
        headers = headers.model_copy(update={"patient_sex": "O"})
    return _fit_columns(headers)


# -- the raw walk ------------------------------------------------------------------------------

#: The data set keywords :func:`headers_from_dataset` reads; the raw walk converts exactly these
#: (a keyword missing here fails loudly in :meth:`_Values.get`, and the corpus tests).
INDEXED_KEYWORDS = (
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID",
    "IssuerOfPatientID", "PatientName", "PatientSex", "PatientBirthDate", "PatientAge", "StudyDate",
    "StudyTime", "AccessionNumber", "StudyDescription", "ReferringPhysicianName", "Modality",
    "BodyPartExamined", "SeriesDescription", "SeriesNumber", "InstanceNumber", "ImageType",
    "NumberOfFrames", "Rows", "Columns", "ImagePositionPatient", "ImageOrientationPatient",
    "SpecificCharacterSet", "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated",
)


def _check_pixel_length(ds: _Elements, length: int | None) -> None:
    check_pixel_length(length=length, rows=_int(ds, "Rows"), columns=_int(ds, "Columns"),
                       bits_allocated=_int(ds, "BitsAllocated"), samples_per_pixel=_int(ds, "SamplesPerPixel"),
                       number_of_frames=_int(ds, "NumberOfFrames"),
                       photometric_interpretation=_text(ds, "PhotometricInterpretation"))


_INDEXED = frozenset(INDEXED_KEYWORDS)
_META = frozenset(META_KEYWORDS)


class _Values:
    """The converted values :func:`headers_from_dataset` reads, in place of a ``Dataset``."""

    def __init__(self, values: Mapping[str, Any], known: frozenset[str],
                 file_meta: _Values | None = None) -> None:
        self._values = values
        self._known = known
        self.file_meta = file_meta

    def get(self, key: str, default: Any = None) -> Any:
        if key not in self._known:
            raise RuntimeError(f"{key} is read by headers_from_dataset: add it to INDEXED_KEYWORDS")
        return self._values.get(key, default)


DEFAULT_MAX_SEQUENCE_DEPTH = 64


def read_headers(path: Path, *, max_sequence_depth: int = DEFAULT_MAX_SEQUENCE_DEPTH,
                 data: bytes | None = None) -> InstanceHeaders:
    """Parse a stored/received file's headers (no pixel data) and check that its Pixel Data is
    complete. Every parse failure becomes :class:`CannotUnderstand`, never another exception.

    Sequences nested deeper than ``max_sequence_depth`` are refused: no real object nests more
    than a handful of levels, and a reference receiver crashed on thousands (RELIABILITY-NOTES).

    The answer is always that of :func:`read_headers_pydicom`; the raw walk (:mod:`.walk`)
    gives it several times faster where it can (``bench/header_walk.py``). ``data``, when given,
    is the file's content already in memory (the walk reads it instead of the file).
    """
    headers = _read_headers_fast(path, max_sequence_depth, data)
    if headers is not None:
        return headers
    return read_headers_pydicom(path, max_sequence_depth=max_sequence_depth, data=data)


def _read_headers_fast(path: Path, max_depth: int, data: bytes | None = None) -> InstanceHeaders | None:
    """The headers by the raw walk, or None where the full parse must decide."""
    try:
        with open(path, "rb") if data is None else io.BytesIO(data) as f:
            size = os.fstat(f.fileno()).st_size if data is None else len(data)
            header = walk_header(f, INDEXED_KEYWORDS, file_size=size, max_sequence_depth=max_depth)
            pixel_length = None
            if header.pixel_data_at is not None:
                f.seek(header.pixel_data_at)
                pixel_length = check_pixel_extent(f, transfer_syntax_uid=header.transfer_syntax_uid,
                                                  file_size=size)
    except DicomInputError:
        raise  # a Pixel Data extent the file does not hold: the full parse refuses it alike
    except (NotWalkable, Exception):
        return None
    elements = _Values(header.values, _INDEXED, _Values(header.file_meta, _META))
    headers = headers_from_dataset(elements, transfer_syntax_uid=header.transfer_syntax_uid)
    _check_pixel_length(elements, pixel_length)
    return headers


def read_headers_pydicom(
    path: Path, *, max_sequence_depth: int = DEFAULT_MAX_SEQUENCE_DEPTH, data: bytes | None = None
) -> InstanceHeaders:
    """:func:`read_headers` by a full pydicom parse: the reference, and the path for whatever the
    raw walk leaves to it.

    Every element is converted here (pydicom converts lazily), and a value that cannot be
    converted is refused naming the element and why (an odd-length US, an IS out of range...).
    One kind of defect is tolerated, as a tolerant reader does: an element whose VR is no DICOM
    VR (pydicom reads its bytes, with a 16-bit length, and leaves them unconverted; vendors write
    such headers) is kept unread, unless the index or the pixel description needs that element.
    """
    try:
        with open(path, "rb") if data is None else io.BytesIO(data) as f:
            ds = dcmread(f, stop_before_pixels=True, force=False)
            ts = str(ds.file_meta.get("TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else ""
            depth = _convert_all(ds, max_sequence_depth, top=True)
            if depth > max_sequence_depth:
                raise CannotUnderstand(
                    f"sequences nest deeper than {max_sequence_depth} levels (listener.max_sequence_depth)"
                )
            size = os.fstat(f.fileno()).st_size if data is None else len(data)
            pixel_length = check_pixel_extent(f, transfer_syntax_uid=ts, file_size=size)
    except (IdentifiersMissing, CannotUnderstand):
        raise
    except (InvalidDicomError, RecursionError, ValueError, TypeError, KeyError, IndexError,
            EOFError, OSError, AttributeError, NotImplementedError, OverflowError, MemoryError,
            struct.error, BytesLengthException) as err:
        raise CannotUnderstand(f"dataset cannot be parsed: {type(err).__name__}: {err}") from err
    try:
        headers = headers_from_dataset(ds, transfer_syntax_uid=ts)
    except UidMissing as err:
        raise _explain_missing(path, ds, err, data) from err
    _check_pixel_length(ds, pixel_length)
    return headers


#: Top-level elements that must be readable even when their VR is unknown: what the index files
#: and what decoding the pixels needs (Image Pixel Module, PS3.3 C.7.6.3).
@functools.cache
def _strict_tags() -> frozenset[int | None]:
    return frozenset(tag_for_keyword(kw) for kw in (
        *INDEXED_KEYWORDS, "BitsStored", "HighBit", "PixelRepresentation", "PlanarConfiguration"))


def _element_name(tag: BaseTag) -> str:
    keyword = keyword_for_tag(tag)
    return f"{keyword} {tag}" if keyword else f"element {tag}"


def _convert_all(ds: Dataset, levels_left: int, *, top: bool) -> int:
    """Convert every element of ``ds`` (and its items); return its sequence depth (a sequence's
    item is depth 1, an item nested in it depth 2; no further than one past ``levels_left``)."""
    deepest = 0
    for tag in list(ds.keys()):
        raw = ds.get_item(tag)
        try:
            elem = ds[tag]
        except NotImplementedError as err:  # pydicom: "Unknown Value Representation"
            vr = getattr(raw, "VR", None)
            if vr is not None and vr not in _DICOM_VRS and not (top and tag in _strict_tags()):
                continue  # kept as received, unread (as UN would be)
            raise CannotUnderstand(f"{_element_name(tag)} has VR {vr!r}, which is no DICOM VR: {err}") from err
        except (RecursionError, MemoryError):
            raise
        except Exception as err:
            vr = getattr(raw, "VR", None)
            length = getattr(raw, "length", None)
            raise CannotUnderstand(
                f"{_element_name(tag)} ({vr or 'no VR'}, {length} bytes) cannot be read: "
                f"{type(err).__name__}: {str(err)[:200]}"
            ) from err
        if elem.VR == "SQ":
            for item in elem.value:
                if levels_left <= 0:
                    return deepest + 1
                deepest = max(deepest, 1 + _convert_all(item, levels_left - 1, top=False))
                if deepest > levels_left:
                    return deepest
    return deepest


_DICOM_VRS = frozenset(vr.value for vr in VR if len(vr.value) == 2)


_MAX_SEARCH = 16 << 20  # bytes searched for a hidden UID


def _explain_missing(path: Path, ds: Dataset, err: UidMissing, whole: bytes | None = None) -> DicomInputError:
    """Why an identifying UID was not found: really absent (0xA900, ``err`` itself), or present
    in the bytes but hidden by a broken encoding before it (0xC210, naming where it breaks) -
    a data set is never refused as lacking a UID that it carries. ``whole``: the file's bytes,
    when they are in memory (else read from ``path``)."""
    tag = tag_for_keyword(err.keyword)
    if tag is None:
        return err
    try:
        whole = path.read_bytes() if whole is None else whole
    except OSError:
        return err
    data = whole[:_MAX_SEARCH]
    meta_end = 132
    ts = str(ds.file_meta.get("TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else ""
    little = ts != ExplicitVRBigEndian
    needle = struct.pack("<HH" if little else ">HH", tag >> 16, tag & 0xFFFF)
    at = data.find(needle, meta_end)
    while at != -1:
        if ts == ImplicitVRLittleEndian or data[at + 4:at + 6] == b"UI":
            break
        at = data.find(needle, at + 1)
    if at == -1:
        return err
    try:  # read again, unconverted: raw elements know where their values lie
        unread: Dataset = dcmread(io.BytesIO(whole), stop_before_pixels=True, force=True)
    except Exception:
        unread = Dataset()
    # In file order, the first element out of tag order or running past the end of the data is
    # where the parse left the real encoding: the element before it is the likely broken one.
    placed = sorted((getattr(unread.get_item(t), "value_tell", None) or 0, t, unread.get_item(t))
                    for t in unread.keys())  # noqa: SIM118 - iterating a Dataset converts
    where = "the parse of the data set ends before it (a misplaced delimiter or a broken length)"
    previous: tuple[int, BaseTag] | None = None
    for start, elem_tag, raw in placed:
        length = getattr(raw, "length", 0) or 0
        out_of_order = previous is not None and elem_tag <= previous[1]
        past_end = length != 0xFFFFFFFF and start + length > len(data)
        if out_of_order or past_end:
            after = (f"after {_element_name(previous[1])} at byte {previous[0]}"
                     if previous is not None else "at the start")
            where = (f"{after} comes {_element_name(elem_tag)}"
                     f"{' out of order' if out_of_order else ''}"
                     f"{f' claiming {length} bytes' if past_end else ''}")
            break
        previous = (start, elem_tag)
    return CannotUnderstand(  # the cause first: an Error Comment holds 64 characters
        f"broken encoding hides {err.keyword} (byte {at}): {where}"
    )
