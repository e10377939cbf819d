"""Is the Pixel Data all there? Checks of a received file's Pixel Data against the file's end and
against what its Image Pixel Module declares, without reading the pixels (a slide's gigabytes are
never loaded into memory). A failing check refuses the instance with 0xC210 (:class:`CannotUnderstand`):
such a data set cannot be rendered, and the sender hears it now instead of the study failing later.
"""

from __future__ import annotations

import struct
from typing import BinaryIO

from pydicom.uid import ExplicitVRBigEndian, ImplicitVRLittleEndian

from .errors import CannotUnderstand

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
    little = transfer_syntax_uid != ExplicitVRBigEndian
    fmt = "<" if little else ">"
    group, elem = struct.unpack(fmt + "HH", head[:4])
    if (group, elem) != (0x7FE0, 0x0010):
        return None
    if transfer_syntax_uid == ImplicitVRLittleEndian:
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


def check_pixel_length(*, length: int | None, rows: int | None, columns: int | None, bits_allocated: int | None,
                       samples_per_pixel: int | None, number_of_frames: int | None,
                       photometric_interpretation: str | None) -> None:
    """Refuse native Pixel Data shorter than its Image Pixel Module declares (PS3.5 8.1.1, PS3.3
    C.7.6.3): Rows x Columns x Number of Frames x Samples per Pixel x Bits Allocated, in bytes
    (bit-packed when Bits Allocated is 1; YBR_FULL_422 holds two samples per pixel, PS3.3
    C.7.6.3.1.2). Longer is allowed (padding, PS3.5 8.1.1). ``length`` None (encapsulated or no
    Pixel Data) and values that cannot be read (None) are not guessed: the check is skipped."""
    if length is None:
        return
    cols, bits = columns, bits_allocated
    if not rows or not cols or not bits or rows < 0 or cols < 0 or bits < 0:
        return
    samples = samples_per_pixel or 1
    frames = max(number_of_frames or 1, 1)
    if (photometric_interpretation or "") == "YBR_FULL_422":
        samples = 2
    values = rows * cols * frames * samples
    expected = (values + 7) // 8 if bits == 1 else values * ((bits + 7) // 8)
    if length < expected:
        raise CannotUnderstand(
            f"Pixel Data holds {length} bytes, fewer than the {expected} its Rows ({rows}) x Columns "
            f"({cols}) x frames ({frames}) x samples ({samples}) x Bits Allocated ({bits}) declare"
        )
