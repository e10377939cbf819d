"""Reading a file for rendering: its header (tolerantly, files without File Meta too), and the files
under folders. Files become the renderer's input rows in :mod:`.inputs`."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

logger = logging.getLogger(__name__)


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


def sort_paths(paths: Sequence[Path]) -> list[Path]:
    """Sorted regular files under the given files or folders (helper for CLI and tests)."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out.extend(sorted(q for q in p.rglob("*") if q.is_file()))
        elif p.is_file():
            out.append(p)
    return out
