"""Decoding chosen frames and turning stored values into display grey levels or RGB.

The grayscale pipeline follows PS3.4 N.2.1 (Grayscale Transformations): Modality LUT (rescale or
Modality LUT Sequence), VOI LUT (window or VOI LUT Sequence), then Presentation LUT Shape /
MONOCHROME1 polarity. Colour images follow PS3.4 N.2.3 (palette, or YBR converted to RGB).
pydicom 3's own implementations are used for each step (``pydicom.pixels``); this module only
decides which step applies, flattens enhanced multi-frame functional groups (PS3.3 C.7.6.16) so those
functions see per-frame values, and maps results to 8 bits.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi,
    apply_windowing,
)
from pydicom.pixels.utils import iter_pixels
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from .errors import SeriesRenderError

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Window:
    """A VOI window (PS3.3 C.11.2.1.2): centre and width in output units of the Modality LUT."""

    center: float
    width: float
    name: str
    function: str = "LINEAR"

    def label(self) -> str:
        """E.g. ``"C40/W400 soft tissue"``."""
        return f"C{self.center:g}/W{self.width:g} {self.name}".strip()


#: Standard CT windows in Hounsfield units (centre, width).
CT_WINDOWS: dict[str, Window] = {
    "soft tissue": Window(40, 400, "soft tissue"),
    "lung": Window(-600, 1500, "lung"),
    "bone": Window(400, 1800, "bone"),
    "brain": Window(40, 80, "brain"),
}


@dataclass(frozen=True, slots=True)
class DisplayImage:
    """8-bit pixels ready to encode (H x W grey or H x W x 3 RGB) and the window that made them."""

    pixels: np.ndarray
    window: str | None


def _compact_error(err: BaseException) -> str:
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(err).__name__}: {text}"


def _ensure_transfer_syntax(ds: Dataset) -> None:
    """Give a File-Meta-less dataset the transfer syntax it was read with (PS3.5 10.1)."""
    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID"):
        return
    implicit, little = ds.original_encoding
    if implicit:
        uid = ImplicitVRLittleEndian
    else:
        uid = ExplicitVRLittleEndian if little in (True, None) else ExplicitVRBigEndian
    if meta is None:
        ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uid


def check_decodable(ds: Dataset) -> None:
    """Raise :class:`SeriesRenderError` when no installed plugin can decode the transfer syntax."""
    meta = getattr(ds, "file_meta", None)
    uid = UID(str(meta.get("TransferSyntaxUID", ""))) if meta is not None else UID("")
    if not uid:
        return
    if not uid.is_transfer_syntax:
        raise SeriesRenderError(
            f"unsupported transfer syntax {uid}: unknown to pydicom {_pydicom_version()}, "
            "no decoder available"
        )
    if uid.is_compressed:
        try:
            decoder = get_decoder(uid)
        except NotImplementedError as err:
            raise SeriesRenderError(
                f"unsupported transfer syntax {uid} ({uid.name}): no pydicom decoder"
            ) from err
        if not decoder.is_available:
            raise SeriesRenderError(
                f"transfer syntax {uid} ({uid.name}): no decoding plugin installed "
                f"({', '.join(decoder.missing_dependencies) or 'none'})"
            )


def _pydicom_version() -> str:
    return str(pydicom.__version__)


#: Read besides the Image Pixel module (group 0028) that ``iter_pixels`` returns: polarity and the
#: enhanced multi-frame functional groups that carry per-frame rescale and window values.
_EXTRA_TAGS: list[int] = [
    0x00181210,  # Convolution Kernel: what a CT reconstruction is for (lung, bone)
    0x0008103E,  # Series Description
    0x20500020,  # Presentation LUT Shape
    0x52009229,  # Shared Functional Groups Sequence
    0x52009230,  # Per-frame Functional Groups Sequence
]


def read_frames(path: Path, indices: Sequence[int]) -> tuple[Dataset, dict[int, np.ndarray]]:
    """Decode only ``indices`` (0-based frame numbers) of ``path``; return header and frames.

    pydicom's ``iter_pixels`` reads the file once and decodes just the requested frames. Files it
    cannot open directly (no File Meta, deflated datasets) are read whole and decoded from the
    dataset instead.
    """
    wanted = sorted({int(i) for i in indices})
    ds = Dataset()
    frames: dict[int, np.ndarray] = {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            frames_iter = iter_pixels(
                str(path), ds_out=ds, specific_tags=_EXTRA_TAGS, indices=wanted
            )
            for idx, arr in zip(wanted, frames_iter, strict=False):
                frames[idx] = arr
        return ds, frames
    except (
        AttributeError,
        ValueError,
        KeyError,
        TypeError,
        NotImplementedError,
        RuntimeError,
    ) as err:
        first_error = err
    # Second route: parse the whole dataset tolerantly, then decode from it.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            full = dcmread(path, force=True)
    except Exception as err:  # pydicom raises many types on corrupt input
        raise SeriesRenderError(f"{path.name}: unreadable ({_compact_error(err)})") from err
    if "PixelData" not in full and "FloatPixelData" not in full:
        raise SeriesRenderError(f"{path.name}: no Pixel Data element")
    _ensure_transfer_syntax(full)
    check_decodable(full)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            frames = {}
            for idx, arr in zip(wanted, iter_pixels(full, indices=wanted), strict=False):
                frames[idx] = arr
    except Exception as err:  # decoder plugins raise RuntimeError, ValueError, OSError...
        logger.debug("direct decoding failed first: %s", _compact_error(first_error))
        raise SeriesRenderError(
            f"{path.name}: cannot decode pixel data ({_compact_error(err)})"
        ) from err
    full_header = Dataset()
    for elem in full:
        if elem.tag.group != 0x7FE0:
            full_header.add(elem)
    full_header.file_meta = full.file_meta
    full_header.set_original_encoding(*full.original_encoding)
    return full_header, frames


_PIXEL_KEYWORDS = (
    "PhotometricInterpretation",
    "SamplesPerPixel",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "RescaleSlope",
    "RescaleIntercept",
    "RescaleType",
    "ModalityLUTSequence",
    "WindowCenter",
    "WindowWidth",
    "WindowCenterWidthExplanation",
    "VOILUTFunction",
    "VOILUTSequence",
    "PresentationLUTShape",
)


def frame_dataset(ds: Dataset, index: int) -> Dataset:
    """The pixel-module and LUT attributes that apply to frame ``index`` (0-based), flattened.

    Enhanced multi-frame objects carry rescale and window values in the Shared and Per-frame
    Functional Groups (Pixel Value Transformation, Frame VOI LUT; PS3.3 C.7.6.16.2.9, .10); per-frame
    values override shared ones. The result is what pydicom's LUT functions expect. Datasets without
    functional groups are returned as they are (the LUT functions only read them).
    """
    if "SharedFunctionalGroupsSequence" not in ds and "PerFrameFunctionalGroupsSequence" not in ds:
        return ds
    out = Dataset()
    for kw in _PIXEL_KEYWORDS:
        if kw in ds:
            out[kw] = ds[kw]
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        out.file_meta = meta
    if ds.original_encoding[0] is not None:
        out.set_original_encoding(*ds.original_encoding)
    groups: list[Dataset] = []
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        groups.append(shared[0])
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and index < len(per_frame):
        groups.append(per_frame[index])
    for group in groups:
        pvt = group.get("PixelValueTransformationSequence")
        if pvt:
            for kw in ("RescaleSlope", "RescaleIntercept", "RescaleType"):
                if kw in pvt[0]:
                    out[kw] = pvt[0][kw]
        voi = group.get("FrameVOILUTSequence")
        if voi:
            for kw in (
                "WindowCenter",
                "WindowWidth",
                "WindowCenterWidthExplanation",
                "VOILUTFunction",
            ):
                if kw in voi[0]:
                    out[kw] = voi[0][kw]
    return out


def _first(value: Any) -> Any:
    if isinstance(value, list | tuple) or (
        hasattr(value, "__iter__") and not isinstance(value, str)
    ):
        items = list(value)
        return items[0] if items else None
    return value


@functools.lru_cache(maxsize=64)
def _window_dataset(window: Window) -> Dataset:
    """A VOI LUT Module whose output range is 0..255 (8-bit unsigned, no rescale)."""
    wds = Dataset()
    wds.PhotometricInterpretation = "MONOCHROME2"
    wds.BitsStored = 8
    wds.PixelRepresentation = 0
    wds.WindowCenter = float(window.center)
    wds.WindowWidth = float(window.width)
    wds.VOILUTFunction = window.function
    return wds


def apply_window(values: np.ndarray, window: Window) -> np.ndarray:
    """Map modality values through ``window`` to 0..255 with pydicom's windowing (PS3.3 C.11.2.1.2)."""
    out: np.ndarray = apply_windowing(values, _window_dataset(window))
    grey: np.ndarray = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return grey


def auto_window(values: np.ndarray, counts: np.ndarray | None = None) -> Window:
    """A window spanning the 0.5-99.5 percentiles of the image (default without header VOI).

    With ``counts``, ``values`` is a lookup domain and ``counts`` how many pixels have each entry.
    """
    if counts is None:
        flat = values.reshape(-1)
        sample = flat[:: max(1, flat.size // 65536)]
        lo, hi = (float(v) for v in np.percentile(sample, [0.5, 99.5]))
        vmin, vmax = float(flat.min()), float(flat.max())
    else:
        order = np.argsort(values, kind="stable")
        ranked = values[order]
        cdf = np.cumsum(counts[order])
        total = float(cdf[-1])
        lo = float(ranked[int(np.searchsorted(cdf, 0.005 * total))])
        hi = float(ranked[min(int(np.searchsorted(cdf, 0.995 * total)), len(order) - 1)])
        present = values[counts > 0]
        vmin, vmax = float(present.min()), float(present.max())
    if hi - lo < 1e-6:
        lo, hi = vmin, vmax
    if hi - lo < 1e-6:
        hi = lo + 1.0
    return Window(round((lo + hi) / 2, 2), round(hi - lo, 2), "auto", "LINEAR_EXACT")


def range_window(values: np.ndarray, counts: np.ndarray | None = None) -> Window:
    """A window spanning every value present, from the lowest to the highest (PET hot spots
    stay visible, where a percentile window would clip them)."""
    present = values if counts is None else values[counts > 0]
    lo, hi = float(np.min(present)), float(np.max(present))
    if hi - lo < 1e-6:
        hi = lo + 1.0
    return Window(round((lo + hi) / 2, 4), round(hi - lo, 4), "pixel range", "LINEAR_EXACT")


def header_window_unusable(fds: Dataset) -> bool:
    """True when the header gives a window that cannot be applied: a width of 0 or below (seen
    on PET: PS3.3 C.11.2.1.2 requires a width of at least 1, or above 0 for LINEAR_EXACT)."""
    width = fds.get("WindowWidth")
    if width is None or fds.get("WindowCenter") is None:
        return False
    try:
        return float(_first(width)) <= 0
    except (TypeError, ValueError):
        return False


def header_window(fds: Dataset) -> Window | None:
    """The first Window Center/Width of the header, or None when absent or unusable."""
    center = fds.get("WindowCenter")
    width = fds.get("WindowWidth")
    if center is None or width is None:
        return None
    try:
        c = float(_first(center))
        w = float(_first(width))
    except (TypeError, ValueError):
        return None
    function = str(fds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        function = "LINEAR"
    if (function == "LINEAR" and w < 1) or w <= 0:
        return None
    return Window(c, w, "header", function)


def _voi_lut(values: np.ndarray, fds: Dataset) -> np.ndarray | None:
    seq = fds.get("VOILUTSequence")
    if not seq or "LUTDescriptor" not in seq[0] or "LUTData" not in seq[0]:
        return None
    ints = values if np.issubdtype(values.dtype, np.integer) else np.rint(values).astype(np.int64)
    out = apply_voi(ints, fds, 0)
    lut_max = float(np.max(out)) if out.size else 0.0
    descriptor = list(seq[0].LUTDescriptor)
    top = max(lut_max, 1.0) if descriptor[2] > 8 else 255.0
    return np.clip(np.rint(out.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)


def _inverted(fds: Dataset) -> bool:
    """PS3.3 C.11.6.1: an explicit Presentation LUT Shape decides; otherwise MONOCHROME1 inverts."""
    shape = str(fds.get("PresentationLUTShape", "") or "").strip().upper()
    if shape in ("IDENTITY", "INVERSE"):
        return shape == "INVERSE"
    return str(fds.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1"


def _to_uint8_colour(arr: np.ndarray, bits: int) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    shift = max(bits - 8, 0)
    out: np.ndarray = np.clip(arr.astype(np.uint32) >> shift, 0, 255).astype(np.uint8)
    return out


def modality_values(arr: np.ndarray, fds: Dataset) -> np.ndarray:
    """Stored values through the Modality LUT (rescale or LUT sequence), PS3.3 C.11.1."""
    return apply_modality_lut(arr, fds)


#: Largest stored-value range mapped through a lookup table instead of pixel by pixel.
_MAX_LUT_ENTRIES = 1 << 16


def _grey(
    stored: np.ndarray, fds: Dataset, window: Window | None, counts: np.ndarray | None
) -> tuple[np.ndarray, str | None]:
    """Modality LUT, VOI and polarity applied to ``stored`` values; returns 8-bit grey and the window label."""
    values = modality_values(stored, fds)
    label: str | None
    if window is not None:
        grey = apply_window(values, window)
        label = window.label()
    else:
        lut = _voi_lut(values, fds)
        if lut is not None:
            grey = lut
            label = "VOI LUT (header)"
        else:
            chosen = header_window(fds) or (
                range_window(values, counts) if header_window_unusable(fds) else auto_window(values, counts)
            )
            grey = apply_window(values, chosen)
            label = chosen.label()
    if _inverted(fds):
        grey = 255 - grey
    return grey, label


def grey_display(
    arr: np.ndarray, fds: Dataset, window: Window | None
) -> tuple[np.ndarray, str | None]:
    """The grayscale pipeline of PS3.4 N.2.1 for one frame, as a viewer does it: through a LUT.

    For integer pixels the pipeline (pydicom's modality LUT and windowing functions) is evaluated
    once per stored value present in the frame's range, and the frame is mapped through that table,
    which is exact and several times faster than transforming every pixel.
    """
    if np.issubdtype(arr.dtype, np.integer) and arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if hi - lo < _MAX_LUT_ENTRIES:
            index: np.ndarray
            if arr.itemsize <= 2:
                # offsets below 2**bits are exact in wrapping unsigned arithmetic: no widening pass
                native = arr if arr.dtype.isnative else arr.astype(arr.dtype.newbyteorder("="))
                unsigned = np.dtype(f"u{arr.itemsize}")
                index = native.view(unsigned) - unsigned.type(lo & (2 ** (8 * arr.itemsize) - 1))
            else:
                index = np.subtract(arr, lo, dtype=np.int64)
            domain = np.arange(lo, hi + 1, dtype=np.int64)
            counts = (
                np.bincount(index.reshape(-1), minlength=domain.size) if window is None else None
            )
            lut, label = _grey(domain, fds, window, counts)
            return np.take(lut, index, axis=0), label
    return _grey(arr, fds, window, None)


def to_display(
    arr: np.ndarray, ds: Dataset, index: int, window: Window | None = None
) -> DisplayImage:
    """Turn one decoded frame into 8-bit display pixels.

    ``window`` forces a VOI window in modality units (used for CT presets); otherwise the header's
    VOI LUT Sequence, then its Window Center/Width, then an automatic percentile window is used.
    """
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    bits = int(ds.get("BitsStored", 8) or 8)
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds)
        descriptor = ds.get("RedPaletteColorLookupTableDescriptor")
        lut_bits = int(descriptor[2]) if descriptor is not None else 8
        if lut_bits > 8 and int(rgb.max(initial=0)) <= 255:
            lut_bits = 8
        return DisplayImage(_to_uint8_colour(rgb, lut_bits), None)
    if arr.ndim == 3:
        # RGB, or YBR_* already converted to RGB by pydicom (pixel_array as_rgb default), PS3.3 C.7.6.3.1.2
        return DisplayImage(_to_uint8_colour(arr, bits), None)
    grey, label = grey_display(arr, frame_dataset(ds, index), window)
    return DisplayImage(np.ascontiguousarray(grey), label)
