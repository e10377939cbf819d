"""Key-image PNGs for a draft made from corpus files: pixels windowed to 8 bits, as the renderer
hands them to the model; the draft's key images get the PNGs' SHA-256 (their identity)."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image

from reporting.draft import Draft


def _png(path: Path) -> bytes:
    ds = pydicom.dcmread(path)
    arr = ds.pixel_array.astype(np.float64)
    if arr.ndim == 3 and arr.shape[-1] != 3:
        arr = arr[0]
    arr = arr * float(ds.get("RescaleSlope", 1) or 1) + float(ds.get("RescaleIntercept", 0) or 0)
    lo, hi = np.percentile(arr, (1, 99))
    scaled = np.clip((arr - lo) / max(hi - lo, 1e-6) * 255, 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(scaled).save(out, format="PNG")
    return out.getvalue()


def with_key_image_pngs(draft: Draft, paths: Sequence[Path], labels: Sequence[str] = ()) -> tuple[Draft, dict[str, bytes]]:
    """``draft`` with one key image per file in ``paths`` (same order as its key images), the
    PNG bytes keyed by SHA-256 as the PDF builder takes them."""
    pngs: dict[str, bytes] = {}
    keys = []
    for i, (ki, path) in enumerate(zip(draft.key_images, paths, strict=False)):
        png = _png(path)
        digest = hashlib.sha256(png).hexdigest()
        pngs[digest] = png
        keys.append(ki.model_copy(update={"sha256": digest, "label": labels[i] if i < len(labels) else ki.label}))
    return draft.model_copy(update={"key_images": tuple(keys)}), pngs
