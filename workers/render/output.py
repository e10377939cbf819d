"""A rendered study as files: ``NN-label.png`` per key image and ``provenance.json``.

:func:`render_files` names the bytes (the pipeline hands them to storage as one folder);
:func:`write_render_output` writes them to a folder of the user's (``taqrir render``).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from .model import RenderedStudy

logger = logging.getLogger(__name__)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:48] or "image"


def provenance(rendered: RenderedStudy, files: list[str] | None = None) -> dict[str, Any]:
    """The JSON-able provenance of a rendered study (one entry per key image, in order)."""
    images = []
    for n, ki in enumerate(rendered.key_images):
        entry: dict[str, Any] = {
            "index": n + 1,
            "label": ki.label,
            "window": ki.window,
            "width": ki.width,
            "height": ki.height,
            "sha256": ki.sha256,
            "series_instance_uid": ki.series_instance_uid,
            "sop_class_uid": ki.sop_class_uid,
            "sop_instance_uids": list(ki.sop_instance_uids),
            "frames": list(ki.frames),
        }
        if files is not None:
            entry["file"] = files[n]
        images.append(entry)
    return {
        "key_images": images,
        "decisions": [
            {"series_instance_uid": d.series_instance_uid, "chosen": d.chosen, "reason": d.reason}
            for d in rendered.decisions
        ],
        "failures": [{"series_instance_uid": uid, "reason": why} for uid, why in rendered.failures],
        "skipped_instances": [
            {"series_instance_uid": series, "sop_instance_uid": sop, "reason": why}
            for series, sop, why in rendered.skipped
        ],
    }


PROVENANCE_FILE = "provenance.json"


def render_files(rendered: RenderedStudy) -> dict[str, bytes]:
    """``NN-label.png`` per key image, in order, and ``provenance.json`` naming them (pure)."""
    files = {f"{n:02d}-{_slug(ki.label)}.png": ki.png for n, ki in enumerate(rendered.key_images, start=1)}
    names = list(files)
    files[PROVENANCE_FILE] = (json.dumps(provenance(rendered, names), indent=2, ensure_ascii=False) + "\n").encode()
    return files


def write_render_output(rendered: RenderedStudy, out_dir: Path) -> Path:
    """Write :func:`render_files` into ``out_dir``; return the provenance path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = render_files(rendered)
    for name, data in files.items():
        (out_dir / name).write_bytes(data)
    logger.info("wrote %d key images", len(files) - 1)
    return out_dir / PROVENANCE_FILE
