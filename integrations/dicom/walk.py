"""A fast read of a DICOM file's header: a walk over its raw bytes that answers exactly what
pydicom answers, or steps aside.

The full pydicom parse of a CT slice's header costs ~2 ms, most of the ingest budget, almost all
of it pydicom building and converting ~40 elements the index then throws away. :func:`walk_header`
walks the raw header bytes instead (explicit VR little endian, the transfer syntax of nearly
everything sent to us, ~0.2 ms): it checks the structure, the sequence depth and that every
element's value converts (the values whose pydicom conversion can fail are converted by pydicom
itself, :func:`pydicom.values.convert_value`), and converts only the elements asked for, with
pydicom's own converter and the data set's character sets (PS3.5 6.1), as
``Dataset.__getitem__`` would.

Whenever it is not certain to reach exactly pydicom's answer (another transfer syntax, a UN or
undefined-length value, odd lengths, unsorted tags, a truncated header, a pydicom configuration
other than the one its reasoning holds for...) it raises :class:`NotWalkable` and the caller
parses with pydicom. It reads pydicom's configuration, never changes it: the walk holds for
pydicom's defaults (reading validation WARN) and for IGNORE, whoever sets it.

Only pydicom's public API is used. ``tests/integrations/dicom/test_headers_walk.py`` compares it
with ``dcmread(specific_tags=...)`` on every file of the corpus; ``bench/header_walk.py`` times
both.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO, NoReturn, cast

import pydicom.hooks
from pydicom import config as pydicom_config
from pydicom.charset import convert_encodings
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement, empty_value_for_VR
from pydicom.tag import BaseTag
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    PrivateTransferSyntaxes,
)
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, VR
from pydicom.values import convert_value

#: The file meta keywords every walk reads (PS3.10 7.1).
META_KEYWORDS = ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID")
#: The LUT descriptors (PS3.3 C.7.6.3.1.5, C.11.1.1): pydicom's default ``raw_element_value`` hook
#: converts them differently from :func:`convert_value` (a first value read as unsigned), so the
#: walk does not convert them.
LUT_DESCRIPTOR_TAGS = frozenset({0x00281101, 0x00281102, 0x00281103, 0x00283002})


class NotWalkable(Exception):
    """The walk is not certain of pydicom's answer for this file: parse it with pydicom. The
    message says why (for tests and the benchmark; it is no refusal of the file)."""


@dataclass(frozen=True)
class Header:
    """What :func:`walk_header` read: the top-level values asked for that the file holds, and the
    file meta's, converted as ``Dataset.__getitem__`` converts them."""

    values: Mapping[str, Any]
    file_meta: Mapping[str, Any]
    transfer_syntax_uid: str
    #: Where the Pixel Data (or Float/Double Float Pixel Data) element starts, None without one.
    pixel_data_at: int | None
    file_size: int


def walk_applies() -> bool:
    """The walk's reasoning about which conversions can fail holds for pydicom's defaults and for
    reading validation IGNORE, not for every configuration (RAISE, value classes of numpy or
    Decimal, callbacks and hooks that change raw elements)."""
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


@functools.lru_cache(maxsize=32)
def _tags(keywords: tuple[str, ...]) -> dict[int, str]:
    out = {}
    for kw in keywords:
        tag = tag_for_keyword(kw)
        if tag is None:
            raise ValueError(f"{kw!r} is no DICOM keyword")
        if tag in LUT_DESCRIPTOR_TAGS:
            raise ValueError(f"{kw} is a LUT descriptor, which the walk does not convert")
        out[tag] = kw
    return out


_META_TAGS = _tags(META_KEYWORDS)
_CHARSET_TAG = 0x00080005
_PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})  # where stop_before_pixels stops
_ITEM_TAG, _ITEM_END_TAG, _SEQ_END_TAG = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_ELEMENT = struct.Struct("<HH2sH")  # tag, VR, 16-bit length (explicit VR little endian)
_ITEM_HEADER = struct.Struct("<HHL")  # item and delimiter headers: tag, 32-bit length
_U32 = struct.Struct("<L")
_LONG_VR = frozenset(vr.encode() for vr in EXPLICIT_VR_LENGTH_32)  # 32-bit length, as pydicom reads
_VALID_VR = frozenset(vr.value.encode() for vr in VR if len(vr.value) == 2)

# Whether pydicom's conversion of a value (pydicom.values.convert_value, with the settings
# walk_applies requires) can raise, by VR. It cannot for latin-1 decoding and splitting, or
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


class _NeedMore(Exception):
    """The bytes read so far end inside the header."""


def _convert(tag: int, vr: bytes, buf: bytes, at: int, length: int, encodings: str | list[str]) -> Any:
    """A value exactly as ``Dataset.__getitem__`` converts it (explicit VR little endian): for a
    VR other than UN, pydicom's default ``raw_element_vr`` hook keeps the VR and its
    ``raw_element_value`` hook is ``convert_value`` (plus a fix for LUT descriptors, which are
    never converted here: :func:`_tags` refuses them), so ``convert_value`` is called directly.

    Most values repeat from one instance of a series to the next (UIDs, names, descriptions,
    orientation, pixel spacing...), and a conversion depends only on the VR, the bytes and the
    character sets, so short values are remembered: of the ~30 conversions per CT slice, ~3 are
    new. The values are only read by callers, never changed.
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




class _Walk:
    """One pass over the raw header bytes of an explicit VR little endian file (the hot loop of
    the ingest path: written for speed, every check inline)."""

    def __init__(self, buf: bytes, complete: bool, wanted: Mapping[int, str]) -> None:
        self.buf = buf
        self.wanted = wanted  # top-level tags whose values are converted
        self.end = len(buf)
        self.complete = complete  # buf holds the whole file
        self.pixel_at: int | None = None
        self.encodings: str | list[str] = "iso8859"  # the top level's, as read_dataset sets it
        self.top: dict[int, tuple[bytes, int, int]] = {}  # wanted tag -> (VR, value at, length)
        self.meta: dict[int, tuple[bytes, int, int]] = {}

    def short(self) -> NoReturn:
        """The bytes end inside an element: read more, or (the file ends there) let pydicom say
        what it makes of a truncated header."""
        raise NotWalkable("truncated") if self.complete else _NeedMore()

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
            raise NotWalkable(f"VR {vr!r}")
        return group << 16 | elem, vr, length, pos + 8

    def file_meta(self) -> int:
        """Walk the File Meta group; returns where the data set starts."""
        if self.end < 132:
            self.short()
        if self.buf[128:132] != b"DICM":
            raise NotWalkable("no DICM prefix")
        pos, prev = 132, -1
        while True:
            if pos == self.end and self.complete:
                raise NotWalkable("no data set")
            tag, vr, length, at = self.header(pos)
            if tag >> 16 != 2:
                if tag >> 16 == 0:
                    raise NotWalkable("command set elements")
                return pos
            if tag <= prev or vr == b"SQ" or length == _UNDEFINED:
                raise NotWalkable("unusual file meta")
            prev = tag
            pos = at + length
            if pos > self.end:
                self.short()
            if vr in _TEXT:
                self.check(tag, vr, at, pos, "iso8859")
            elif not (vr in _NEVER_FAIL or (vr in _FIXED_SIZE and not length % _FIXED_SIZE[vr])):
                raise NotWalkable("unusual file meta")
            if tag in _META_TAGS:
                self.meta[tag] = (vr, at, length)

    def check(self, tag: int, vr: bytes, at: int, end: int, encodings: str | list[str]) -> None:
        """Make sure pydicom converts this text or DS/IS value without an exception."""
        if vr in _TEXT:
            chunk = self.buf[at:end]
            if chunk.isascii() and b"\x1b" not in chunk:
                return
            if tag < _CHARSET_TAG:
                raise NotWalkable("text before the character set")
        try:
            _convert(tag, vr, self.buf, at, end - at, encodings)
        except Exception as err:
            raise NotWalkable("value does not convert") from err

    def dataset(self, pos: int, stop: int | None, *, top: bool, levels_left: int,
                encodings: str | list[str]) -> tuple[int, int]:
        """Walk a data set from ``pos``: the top level (up to Pixel Data or the end), an item of
        ``stop - pos`` bytes, or (``stop`` None) an item up to its delimiter. Returns the position
        after it and its sequence depth (as ``headers._convert_all`` counts it)."""
        buf, end, unpack, u32 = self.buf, self.end, _ELEMENT.unpack_from, _U32.unpack_from
        depth, prev = 0, -1
        while True:
            if stop is not None:
                if pos >= stop:
                    if pos != stop:
                        raise NotWalkable("item length")
                    return pos, depth
            elif top and pos == end and self.complete:
                return pos, depth
            if pos + 8 > end:
                self.short()
            group, elem, vr, length = unpack(buf, pos)
            if group == 0xFFFE:  # an item delimiter (it has no VR: the "VR" is its length)
                if not top and stop is None and elem == 0xE00D and u32(buf, pos + 4)[0] == 0:
                    return pos + 8, depth
                raise NotWalkable("misplaced delimiter")
            tag = group << 16 | elem
            if vr in _LONG_VR:
                if pos + 12 > end:
                    self.short()
                length = u32(buf, pos + 8)[0]
                at = pos + 12
            elif vr in _VALID_VR:
                at = pos + 8
            else:
                raise NotWalkable(f"VR {vr!r}")
            if top and tag in _PIXEL_TAGS:
                self.pixel_at = pos
                return pos, depth
            if tag <= prev or (top and group in (0, 2)):
                raise NotWalkable("tags out of order")
            prev = tag
            if vr == b"SQ":
                if top and tag in self.wanted:
                    raise NotWalkable("a wanted element holds a sequence")
                pos, d = self.sequence(at, None if length == _UNDEFINED else at + length,
                                       levels_left=levels_left, encodings=encodings)
                depth = max(depth, d)
                continue
            if length == _UNDEFINED:
                raise NotWalkable("undefined length value")
            pos = at + length
            if pos > end:
                self.short()
            indexed = top and tag in self.wanted
            if vr in _NEVER_FAIL:
                pass
            elif vr in _FIXED_SIZE:
                if length % _FIXED_SIZE[vr]:
                    raise NotWalkable(f"{vr!r} value of {length} bytes")
            elif vr in _TEXT or vr in _CONVERTED:
                if not indexed:  # wanted values are converted afterwards (failing: step aside)
                    self.check(tag, vr, at, pos, encodings)
            else:
                raise NotWalkable(f"VR {vr!r}")
            if indexed:
                self.top[tag] = (vr, at, length)
            if tag == _CHARSET_TAG:  # this data set's own character set, as pydicom reads it
                try:
                    encodings = convert_encodings(_convert(tag, vr, buf, at, length, "iso8859"))
                except Exception as err:
                    raise NotWalkable("character set") from err
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
                    raise NotWalkable("sequence length")
                return pos, depth
            if pos + 8 > self.end:
                self.short()
            group, elem, length = _ITEM_HEADER.unpack_from(self.buf, pos)
            tag = group << 16 | elem
            if stop is None and tag == _SEQ_END_TAG:
                if length != 0:
                    raise NotWalkable("sequence delimiter length")
                return pos + 8, depth
            if tag != _ITEM_TAG:
                raise NotWalkable("not an item")
            if levels_left <= 0:
                raise NotWalkable("nested too deep")  # pydicom's parse gives the refusal
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
        raise NotWalkable("not (surely) explicit VR little endian")
    return str(ts)


def walk_header(f: BinaryIO, keywords: Iterable[str], *, file_size: int,
                max_sequence_depth: int) -> Header:
    """Walk the header of the DICOM file ``f`` (from its start; ``file_size`` bytes) and convert
    the top-level elements named by ``keywords`` that it holds, as
    ``dcmread(f, specific_tags=keywords, stop_before_pixels=True)`` would read them. Raises
    :class:`NotWalkable` wherever pydicom's answer is not certain, including sequences nested
    deeper than ``max_sequence_depth`` (pydicom's parse gives the refusal) and any value of the
    header that pydicom could not convert."""
    try:
        return _walk_header(f, tuple(keywords), file_size, max_sequence_depth)
    except NotWalkable:
        raise
    except Exception as err:  # any surprise: pydicom decides
        raise NotWalkable(f"{type(err).__name__}: {err}") from err


def _walk_header(f: BinaryIO, keywords: tuple[str, ...], file_size: int, max_sequence_depth: int) -> Header:
    if not walk_applies():
        raise NotWalkable("pydicom configuration other than the walk reasons about")
    wanted = _tags(keywords)
    read = min(file_size, _FIRST_READ)
    while True:
        f.seek(0)
        buf = f.read(read)
        walk = _Walk(buf, len(buf) >= file_size, wanted)
        try:
            start = walk.file_meta()
            meta = {_META_TAGS[t]: _convert(t, vr, buf, at, n, "iso8859")
                    for t, (vr, at, n) in walk.meta.items()}
            ts = _explicit_little(meta)
            walk.dataset(start, None, top=True, levels_left=max_sequence_depth, encodings="iso8859")
            break
        except _NeedMore:
            if read >= _MAX_READ or read >= file_size:
                raise NotWalkable("header too large") from None
            read = min(file_size, read * 8)
    encodings = walk.encodings
    try:  # as Dataset.__getitem__ converts them (the character set itself in latin-1)
        values = {wanted[t]: _convert(t, vr, buf, at, n, "iso8859" if t == _CHARSET_TAG else encodings)
                  for t, (vr, at, n) in walk.top.items()}
    except Exception as err:
        raise NotWalkable("a wanted value does not convert") from err
    return Header(values, meta, ts, walk.pixel_at, file_size)
