"""Read what the index needs from a received instance: a pure function over a file.

Text is decoded by the dataset's Specific Character Set (PS3.5 6.1), Arabic ISO_IR 127 and UTF-8
ISO_IR 192 included; pydicom does the decoding, we only make sure every value is read through it:
``Dataset.__getitem__`` converts each raw element with its dataset's character set (a sequence
item inherits its parent's), so :func:`read_headers` touching every element once decodes all text,
and a separate ``Dataset.decode()`` pass (~0.2 ms per CT slice, a fifth of the parse) is not made.
Only headers are parsed (``stop_before_pixels``): a gigabyte slide costs no more than a CT slice.

That full pydicom parse (:func:`read_headers_pydicom`) costs ~2 ms per CT slice on this VM, most
of the ingest budget, almost all of it pydicom building and converting ~40 elements it then
throws away. :func:`read_headers` therefore first tries a walk of the raw header bytes (explicit
VR little endian, the transfer syntax of nearly everything sent to us, ~0.2 ms): it
checks the structure, the sequence depth and that every element's value converts (the values
whose pydicom conversion can fail are converted by pydicom itself), and converts only the
elements :func:`headers_from_dataset` reads, with pydicom's own converter and the same character
sets. Whenever it is not certain to reach exactly the pydicom answer (another transfer syntax, a
UN or undefined-length value, odd lengths, unsorted tags, a truncated header, a non-default
pydicom configuration...) it steps aside and the full parse decides, so results and refusals
(:class:`CannotUnderstand`, :class:`IdentifiersMissing`) are those of the full parse; the tests
compare both on the whole corpus and on damaged copies of it.
"""

from __future__ import annotations

import functools
import os
import re
import struct
from collections.abc import Mapping
from datetime import date, time
from pathlib import Path
from typing import Any, BinaryIO, NoReturn, Protocol, cast

import pydicom.hooks
from pydantic import BaseModel, ConfigDict
from pydicom import config as pydicom_config
from pydicom import dcmread
from pydicom.charset import convert_encodings
from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.dataelem import RawDataElement, empty_value_for_VR
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.filereader import ENCODED_VR
from pydicom.tag import _LUT_DESCRIPTOR_TAGS, BaseTag
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    PrivateTransferSyntaxes,
)
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32
from pydicom.values import convert_value

from .errors import CannotUnderstand, DicomInputError, IdentifiersMissing

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


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


def _da(value: str | None) -> date | None:
    if not value or len(value) < 8:
        return None
    try:
        return date(int(value[0:4]), int(value[4:6]), int(value[6:8]))
    except ValueError:
        return None


def _tm(value: str | None) -> time | None:
    if not value:
        return None
    digits = value.replace(":", "")
    try:
        hh = int(digits[0:2])
        mm = int(digits[2:4]) if len(digits) >= 4 else 0
        ss_frac = digits[4:] if len(digits) > 4 else "0"
        seconds = float(ss_frac) if ss_frac else 0.0
        return time(hh, mm, min(int(seconds), 59), int((seconds % 1) * 1_000_000))
    except ValueError:
        return None


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
    if len(text) > 64 or not _UID.match(text):
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


_BIG_ENDIAN_TS = "1.2.840.10008.1.2.2"
_IMPLICIT_TS = "1.2.840.10008.1.2"
_LONG_VRS = {b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"SQ", b"UN", b"UC", b"UR", b"UT"}
_ITEM, _SEQ_END = 0xFFFEE000, 0xFFFEE0DD


def check_pixel_extent(f: BinaryIO, *, transfer_syntax_uid: str, file_size: int) -> int | None:
    """Check that the Pixel Data element starting at ``f``'s position lies wholly in the file;
    returns the length of native (not encapsulated) Pixel Data, None otherwise.

    Headers are parsed with ``stop_before_pixels`` (a slide's pixels are never read into memory),
    so a transfer cut short inside Pixel Data would otherwise pass. Native pixel data is checked by
    its length; encapsulated pixel data (PS3.5 A.4) by walking its item headers with seeks.
    """
    start = f.tell()
    head = f.read(8)
    if len(head) < 8:
        return None  # no pixel data element
    little = transfer_syntax_uid != _BIG_ENDIAN_TS
    fmt = "<" if little else ">"
    group, elem = struct.unpack(fmt + "HH", head[:4])
    if (group, elem) != (0x7FE0, 0x0010):
        return None
    if transfer_syntax_uid == _IMPLICIT_TS:
        (length,) = struct.unpack(fmt + "L", head[4:8])
        value_at = start + 8
    elif head[4:6] in _LONG_VRS:
        rest = f.read(4)
        if len(rest) < 4:
            raise CannotUnderstand("Pixel Data element header is truncated")
        (length,) = struct.unpack(fmt + "L", rest)
        value_at = start + 12
    else:
        (length,) = struct.unpack(fmt + "H", head[6:8])
        value_at = start + 8
    if length != 0xFFFFFFFF:
        if value_at + length > file_size:
            raise CannotUnderstand(
                f"Pixel Data declares {length} bytes but only {file_size - value_at} were received"
            )
        return int(length)
    pos = value_at
    while True:
        f.seek(pos)
        item = f.read(8)
        if len(item) < 8:
            raise CannotUnderstand("encapsulated Pixel Data ends before its sequence delimiter")
        g, e, item_len = struct.unpack("<HHL", item)
        tag = (g << 16) | e
        if tag == _SEQ_END:
            return None
        if tag != _ITEM or item_len == 0xFFFFFFFF:
            raise CannotUnderstand(f"encapsulated Pixel Data has an invalid item (tag {tag:08X})")
        pos += 8 + item_len
        if pos > file_size:
            raise CannotUnderstand("an encapsulated Pixel Data fragment runs past the end of the data")


def check_pixel_length(ds: _Elements, *, length: int | None) -> None:
    """Refuse native Pixel Data shorter than its Image Pixel Module declares (PS3.5 8.1.1, PS3.3
    C.7.6.3): Rows x Columns x Number of Frames x Samples per Pixel x Bits Allocated, in bytes
    (bit-packed when Bits Allocated is 1; YBR_FULL_422 holds two samples per pixel, PS3.3
    C.7.6.3.1.2). Such a data set cannot be rendered; the sender hears it now (0xC210) instead of
    the study failing later. Longer is allowed (padding, PS3.5 8.1.1). Values that cannot be read
    are not guessed: the check is skipped."""
    if length is None:
        return
    rows, cols, bits = _int(ds, "Rows"), _int(ds, "Columns"), _int(ds, "BitsAllocated")
    if not rows or not cols or not bits or rows < 0 or cols < 0 or bits < 0:
        return
    samples = _int(ds, "SamplesPerPixel") or 1
    frames = max(_int(ds, "NumberOfFrames") or 1, 1)
    if (_text(ds, "PhotometricInterpretation") or "") == "YBR_FULL_422":
        samples = 2
    values = rows * cols * frames * samples
    expected = (values + 7) // 8 if bits == 1 else values * ((bits + 7) // 8)
    if length < expected:
        raise CannotUnderstand(
            f"Pixel Data holds {length} bytes, fewer than the {expected} its Rows ({rows}) x Columns "
            f"({cols}) x frames ({frames}) x samples ({samples}) x Bits Allocated ({bits}) declare"
        )


def sequence_depth(ds: Dataset, limit: int) -> int:
    """How deep sequences nest in ``ds``, counting no further than ``limit`` + 1."""
    deepest = 0
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                deepest = max(deepest, 1 + sequence_depth(item, limit - 1) if limit > 0 else 1)
                if deepest > limit:
                    return deepest
    return deepest


DEFAULT_MAX_SEQUENCE_DEPTH = 64


def read_headers(path: Path, *, max_sequence_depth: int = DEFAULT_MAX_SEQUENCE_DEPTH) -> InstanceHeaders:
    """Parse a stored/received file's headers (no pixel data) and check that its Pixel Data is
    complete. Every parse failure becomes :class:`CannotUnderstand`, never another exception.

    Sequences nested deeper than ``max_sequence_depth`` are refused: no real object nests more
    than a handful of levels, and a reference receiver crashed on thousands (RELIABILITY-NOTES).

    The answer is always that of :func:`read_headers_pydicom`; the raw walk (see the module
    docstring) gives it about ten times faster when it can.
    """
    if _fast_path_applies():
        headers = _read_headers_fast(path, max_sequence_depth)
        if headers is not None:
            return headers
    return read_headers_pydicom(path, max_sequence_depth=max_sequence_depth)


def read_headers_pydicom(
    path: Path, *, max_sequence_depth: int = DEFAULT_MAX_SEQUENCE_DEPTH
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
        with open(path, "rb") as f:
            ds = dcmread(f, stop_before_pixels=True, force=False)
            ts = str(ds.file_meta.get("TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else ""
            depth = _convert_all(ds, max_sequence_depth, top=True)
            if depth > max_sequence_depth:
                raise CannotUnderstand(
                    f"sequences nest deeper than {max_sequence_depth} levels (listener.max_sequence_depth)"
                )
            pixel_length = check_pixel_extent(f, transfer_syntax_uid=ts, file_size=os.fstat(f.fileno()).st_size)
    except (IdentifiersMissing, CannotUnderstand):
        raise
    except (InvalidDicomError, RecursionError, ValueError, TypeError, KeyError, IndexError,
            EOFError, OSError, AttributeError, NotImplementedError, OverflowError, MemoryError,
            struct.error, BytesLengthException) as err:
        raise CannotUnderstand(f"dataset cannot be parsed: {type(err).__name__}: {err}") from err
    try:
        headers = headers_from_dataset(ds, transfer_syntax_uid=ts)
    except UidMissing as err:
        raise _explain_missing(path, ds, err) from err
    check_pixel_length(ds, length=pixel_length)
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
    """Convert every element of ``ds`` (and its items); return its sequence depth (as
    :func:`sequence_depth` counts, no further than one past ``levels_left``)."""
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


_DICOM_VRS = frozenset(vr.decode() for vr in ENCODED_VR if len(vr) == 2)


def _explain_missing(path: Path, ds: Dataset, err: UidMissing) -> DicomInputError:
    """Why an identifying UID was not found: really absent (0xA900, ``err`` itself), or present
    in the bytes but hidden by a broken encoding before it (0xC210, naming where it breaks) -
    a data set is never refused as lacking a UID that it carries."""
    tag = tag_for_keyword(err.keyword)
    if tag is None:
        return err
    try:
        data = path.read_bytes()[:_MAX_READ]
    except OSError:
        return err
    meta_end = 132
    ts = str(ds.file_meta.get("TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else ""
    little = ts != _BIG_ENDIAN_TS
    needle = struct.pack("<HH" if little else ">HH", tag >> 16, tag & 0xFFFF)
    at = data.find(needle, meta_end)
    while at != -1:
        if ts == _IMPLICIT_TS or data[at + 4:at + 6] == b"UI":
            break
        at = data.find(needle, at + 1)
    if at == -1:
        return err
    try:  # read again, unconverted: raw elements know where their values lie
        unread: Dataset = dcmread(path, stop_before_pixels=True, force=True)
    except Exception:  # noqa: BLE001 - it was read once; if not now, say what is known
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
        past_end = length != _UNDEFINED and start + length > len(data)
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
#: The file meta keywords it reads.
META_KEYWORDS = ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID")


def _tags(keywords: tuple[str, ...]) -> dict[int, str]:
    out = {}
    for kw in keywords:
        tag = tag_for_keyword(kw)
        assert tag is not None, kw
        out[tag] = kw
    return out


_INDEXED_TAGS = _tags(INDEXED_KEYWORDS)
_META_TAGS = _tags(META_KEYWORDS)
_CHARSET_TAG = 0x00080005
_PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})  # where stop_before_pixels stops
_ITEM_TAG, _ITEM_END_TAG, _SEQ_END_TAG = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_ELEMENT = struct.Struct("<HH2sH")  # tag, VR, 16-bit length (explicit VR little endian)
_ITEM_HEADER = struct.Struct("<HHL")  # item and delimiter headers: tag, 32-bit length
_U32 = struct.Struct("<L")
_LONG_VR = frozenset(vr.encode() for vr in EXPLICIT_VR_LENGTH_32)  # 32-bit length, as pydicom reads
_VALID_VR = frozenset(vr for vr in ENCODED_VR if len(vr) == 2)
# Whether pydicom's conversion of a value (pydicom.values.convert_value, with the settings
# _fast_path_applies requires) can raise, by VR. It cannot for latin-1 decoding and splitting, or
# bytes as they are, nor for DS (DSfloat only raises ValueError, which convert_value catches and
# answers by trying other VRs) ...
_NEVER_FAIL = frozenset({b"AE", b"AS", b"CS", b"DA", b"DS", b"DT", b"TM", b"UI", b"UR",
                         b"OB", b"OD", b"OF", b"OL", b"OV", b"OW"})
# ... nor for binary numbers whose length is a multiple of the value size ...
_FIXED_SIZE = {b"AT": 4, b"FD": 8, b"FL": 4, b"SL": 4, b"SS": 2, b"SV": 8, b"UL": 4, b"US": 2, b"UV": 8}
# ... nor for text in a character set when it is plain ASCII (every DICOM character set decodes
# ASCII as ASCII). Other text, and IS (IS("1e400") raises OverflowError), is converted by pydicom
# to find out.
_TEXT = frozenset({b"LO", b"LT", b"PN", b"SH", b"ST", b"UC", b"UT"})
_CONVERTED = frozenset({b"IS"})
_VR_NAME = {vr: vr.decode() for vr in _VALID_VR}
_FIRST_READ = 16 << 10
_MAX_READ = 16 << 20  # headers bigger than this (huge private blobs) go to pydicom


class _Fallback(Exception):
    """The raw walk is not certain of the pydicom answer: parse with pydicom."""


class _NeedMore(Exception):
    """The bytes read so far end inside the header."""


class _Values:
    """The converted values :func:`headers_from_dataset` reads, in place of a ``Dataset``."""

    def __init__(self, values: Mapping[str, Any], known: tuple[str, ...],
                 file_meta: _Values | None = None) -> None:
        self._values = values
        self._known = known
        self.file_meta = file_meta

    def get(self, key: str, default: Any = None) -> Any:
        if key not in self._known:
            raise RuntimeError(f"{key} is read by headers_from_dataset: add it to INDEXED_KEYWORDS")
        return self._values.get(key, default)


def _fast_path_applies() -> bool:
    """The raw walk's reasoning about which conversions can fail holds for pydicom's defaults and
    the listener's settings (reading validation IGNORE), not for every configuration."""
    hooks = pydicom.hooks.hooks
    return (
        pydicom_config.settings.reading_validation_mode != pydicom_config.RAISE
        and not pydicom_config.datetime_conversion
        and not pydicom_config.use_DS_decimal
        and not pydicom_config.use_DS_numpy
        and not pydicom_config.use_IS_numpy
        and pydicom_config.data_element_callback is None
        and hooks.raw_element_vr is pydicom.hooks.raw_element_vr
        and hooks.raw_element_value is pydicom.hooks.raw_element_value
        and not hooks.raw_element_kwargs
    )


def _convert(tag: int, vr: bytes, buf: bytes, at: int, length: int, encodings: str | list[str]) -> Any:
    """A value exactly as ``Dataset.__getitem__`` converts it (explicit VR little endian): for a
    VR other than UN, pydicom's default ``raw_element_vr`` hook keeps the VR and its
    ``raw_element_value`` hook is ``convert_value`` (plus a fix for LUT descriptors, which are
    never converted here: see the assertion below), so ``convert_value`` is called directly.

    Most values repeat from one instance of a series to the next (UIDs, names, descriptions,
    orientation, pixel spacing...), and a conversion depends only on the VR, the bytes and the
    character sets, so short values are remembered: of the ~30 conversions per CT slice, ~3 are
    new. The values are only read (:func:`headers_from_dataset`), never changed.
    """
    value = buf[at:at + length]
    key = (vr, value, encodings if isinstance(encodings, str) else tuple(encodings))
    converted = _converted.get(key, _MISSING)
    if converted is _MISSING:
        vr_s = _VR_NAME[vr]
        raw = RawDataElement(BaseTag(tag), vr_s, length,
                             value if length else cast(bytes | None, empty_value_for_VR(vr_s, raw=True)),
                             at, False, True)
        converted = convert_value(vr_s, raw, encodings)
        if 0 < length <= _CACHED_LENGTH:  # (an empty value's conversion depends on the config)
            if len(_converted) >= _CACHED_VALUES:
                _converted.clear()
            _converted[key] = converted
    return converted


_MISSING = object()
_CACHED_LENGTH = 256
_CACHED_VALUES = 4096
_converted: dict[tuple[bytes, bytes, str | tuple[str, ...]], Any] = {}


assert not (set(_INDEXED_TAGS) | set(_META_TAGS)) & set(_LUT_DESCRIPTOR_TAGS)


class _Walk:
    """One pass over the raw header bytes of an explicit VR little endian file (the hot loop of
    the ingest path: written for speed, every check inline)."""

    def __init__(self, buf: bytes, complete: bool) -> None:
        self.buf = buf
        self.end = len(buf)
        self.complete = complete  # buf holds the whole file
        self.pixel_at: int | None = None
        self.encodings: str | list[str] = "iso8859"  # the top level's, as read_dataset sets it
        self.top: dict[int, tuple[bytes, int, int]] = {}  # indexed tag -> (VR, value at, length)
        self.meta: dict[int, tuple[bytes, int, int]] = {}

    def short(self) -> NoReturn:
        """The bytes end inside an element: read more, or (the file ends there) let pydicom say
        what it makes of a truncated header."""
        raise _Fallback("truncated") if self.complete else _NeedMore()

    def header(self, pos: int) -> tuple[int, bytes, int, int]:
        """(tag, VR, length, value position) of the element header at ``pos``."""
        if pos + 8 > self.end:
            self.short()
        group, elem, vr, length = _ELEMENT.unpack_from(self.buf, pos)
        if vr in _LONG_VR:
            if pos + 12 > self.end:
                self.short()
            return group << 16 | elem, vr, _U32.unpack_from(self.buf, pos + 8)[0], pos + 12
        if vr not in _VALID_VR:
            raise _Fallback(f"VR {vr!r}")
        return group << 16 | elem, vr, length, pos + 8

    def file_meta(self) -> int:
        """Walk the File Meta group; returns where the data set starts."""
        if self.end < 132:
            self.short()
        if self.buf[128:132] != b"DICM":
            raise _Fallback("no DICM prefix")
        pos, prev = 132, -1
        while True:
            if pos == self.end and self.complete:
                raise _Fallback("no data set")
            tag, vr, length, at = self.header(pos)
            if tag >> 16 != 2:
                if tag >> 16 == 0:
                    raise _Fallback("command set elements")
                return pos
            if tag <= prev or vr == b"SQ" or length == _UNDEFINED:
                raise _Fallback("unusual file meta")
            prev = tag
            pos = at + length
            if pos > self.end:
                self.short()
            if vr in _TEXT:
                self.check(tag, vr, at, pos, "iso8859")
            elif not (vr in _NEVER_FAIL or (vr in _FIXED_SIZE and not length % _FIXED_SIZE[vr])):
                raise _Fallback("unusual file meta")
            if tag in _META_TAGS:
                self.meta[tag] = (vr, at, length)

    def check(self, tag: int, vr: bytes, at: int, end: int, encodings: str | list[str]) -> None:
        """Make sure pydicom converts this text or DS/IS value without an exception."""
        if vr in _TEXT:
            chunk = self.buf[at:end]
            if chunk.isascii() and b"\x1b" not in chunk:
                return
            if tag < _CHARSET_TAG:
                raise _Fallback("text before the character set")
        try:
            _convert(tag, vr, self.buf, at, end - at, encodings)
        except Exception as err:
            raise _Fallback("value does not convert") from err

    def dataset(self, pos: int, stop: int | None, *, top: bool, levels_left: int,
                encodings: str | list[str]) -> tuple[int, int]:
        """Walk a data set from ``pos``: the top level (up to Pixel Data or the end), an item of
        ``stop - pos`` bytes, or (``stop`` None) an item up to its delimiter. Returns the position
        after it and its sequence depth (as :func:`sequence_depth` counts)."""
        buf, end, unpack, u32 = self.buf, self.end, _ELEMENT.unpack_from, _U32.unpack_from
        depth, prev = 0, -1
        while True:
            if stop is not None:
                if pos >= stop:
                    if pos != stop:
                        raise _Fallback("item length")
                    return pos, depth
            elif top and pos == end and self.complete:
                return pos, depth
            if pos + 8 > end:
                self.short()
            group, elem, vr, length = unpack(buf, pos)
            if group == 0xFFFE:  # an item delimiter (it has no VR: the "VR" is its length)
                if not top and stop is None and elem == 0xE00D and u32(buf, pos + 4)[0] == 0:
                    return pos + 8, depth
                raise _Fallback("misplaced delimiter")
            tag = group << 16 | elem
            if vr in _LONG_VR:
                if pos + 12 > end:
                    self.short()
                length = u32(buf, pos + 8)[0]
                at = pos + 12
            elif vr in _VALID_VR:
                at = pos + 8
            else:
                raise _Fallback(f"VR {vr!r}")
            if top and tag in _PIXEL_TAGS:
                self.pixel_at = pos
                return pos, depth
            if tag <= prev or (top and group in (0, 2)):
                raise _Fallback("tags out of order")
            prev = tag
            if vr == b"SQ":
                if top and tag in _INDEXED_TAGS:
                    raise _Fallback("an indexed element holds a sequence")
                pos, d = self.sequence(at, None if length == _UNDEFINED else at + length,
                                       levels_left=levels_left, encodings=encodings)
                depth = max(depth, d)
                continue
            if length == _UNDEFINED:
                raise _Fallback("undefined length value")
            pos = at + length
            if pos > end:
                self.short()
            indexed = top and tag in _INDEXED_TAGS
            if vr in _NEVER_FAIL:
                pass
            elif vr in _FIXED_SIZE:
                if length % _FIXED_SIZE[vr]:
                    raise _Fallback(f"{vr!r} value of {length} bytes")
            elif vr in _TEXT or vr in _CONVERTED:
                if not indexed:  # indexed values are converted afterwards (failing: fall back)
                    self.check(tag, vr, at, pos, encodings)
            else:
                raise _Fallback(f"VR {vr!r}")
            if indexed:
                self.top[tag] = (vr, at, length)
            if tag == _CHARSET_TAG:  # this data set's own character set, as pydicom reads it
                try:
                    encodings = convert_encodings(_convert(tag, vr, buf, at, length, "iso8859"))
                except Exception as err:
                    raise _Fallback("character set") from err
                if top:
                    self.encodings = encodings

    def sequence(self, pos: int, stop: int | None, *, levels_left: int,
                 encodings: str | list[str]) -> tuple[int, int]:
        """Walk a sequence's items (to ``stop``, or to its delimiter); returns the position after
        it and its depth (0 without items)."""
        depth = 0
        while True:
            if stop is not None and pos >= stop:
                if pos != stop:
                    raise _Fallback("sequence length")
                return pos, depth
            if pos + 8 > self.end:
                self.short()
            group, elem, length = _ITEM_HEADER.unpack_from(self.buf, pos)
            tag = group << 16 | elem
            if stop is None and tag == _SEQ_END_TAG:
                if length != 0:
                    raise _Fallback("sequence delimiter length")
                return pos + 8, depth
            if tag != _ITEM_TAG:
                raise _Fallback("not an item")
            if levels_left <= 0:
                raise _Fallback("nested too deep")  # pydicom's parse gives the refusal
            item_stop = None if length == _UNDEFINED else pos + 8 + length
            pos, d = self.dataset(pos + 8, item_stop, top=False, levels_left=levels_left - 1,
                                  encodings=encodings)
            depth = max(depth, 1 + d)


def _explicit_little(meta: Mapping[str, Any]) -> str:
    """The transfer syntax, when pydicom reads the data set as explicit VR little endian."""
    ts = meta.get("TransferSyntaxUID")
    if (not isinstance(ts, str)
            or ts in (ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian)
            or ts in PrivateTransferSyntaxes):
        raise _Fallback("not (surely) explicit VR little endian")
    return str(ts)


def _walk(f: BinaryIO, size: int, max_depth: int) -> tuple[_Walk, dict[str, Any], str]:
    """Walk the header of ``f``, reading more of it while it does not fit."""
    read = min(size, _FIRST_READ)
    while True:
        f.seek(0)
        buf = f.read(read)
        walk = _Walk(buf, len(buf) >= size)
        try:
            start = walk.file_meta()
            meta = {_META_TAGS[t]: _convert(t, vr, buf, at, n, "iso8859")
                    for t, (vr, at, n) in walk.meta.items()}
            ts = _explicit_little(meta)
            walk.dataset(start, None, top=True, levels_left=max_depth, encodings="iso8859")
            return walk, meta, ts
        except _NeedMore:
            if read >= _MAX_READ or read >= size:
                raise _Fallback("header too large") from None
            read = min(size, read * 8)


def _read_headers_fast(path: Path, max_depth: int) -> InstanceHeaders | None:
    """The headers by the raw walk, or None where the full parse must decide."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            walk, meta, ts = _walk(f, size, max_depth)
            buf, encodings = walk.buf, walk.encodings
            values = {  # as Dataset.__getitem__ converts them (the character set itself in latin-1)
                _INDEXED_TAGS[t]: _convert(t, vr, buf, at, n,
                                           "iso8859" if t == _CHARSET_TAG else encodings)
                for t, (vr, at, n) in walk.top.items()
            }
            pixel_length = None
            if walk.pixel_at is not None:
                f.seek(walk.pixel_at)
                pixel_length = check_pixel_extent(f, transfer_syntax_uid=ts, file_size=size)
    except (IdentifiersMissing, CannotUnderstand):
        raise
    except Exception:  # noqa: BLE001 - _Fallback, or any surprise: the full parse decides
        return None
    elements = _Values(values, INDEXED_KEYWORDS, _Values(meta, META_KEYWORDS))
    headers = headers_from_dataset(elements, transfer_syntax_uid=ts)
    check_pixel_length(elements, length=pixel_length)
    return headers
