"""Text of a PDF as poppler's pdftotext gives it, whole or by region (see reporting/dicom/pdf.py
for why the Arabic column is read as its own region)."""

from __future__ import annotations

import re
import shutil
import subprocess
import unicodedata
import xml.etree.ElementTree as ET
from pathlib import Path

_ARABIC = re.compile(r"[\u0600-\u06FF]")
_BIDI_MARKS = dict.fromkeys(range(0x202A, 0x202F)) | dict.fromkeys((0x200E, 0x200F))


def _pdftotext(*args: str) -> str:
    exe = shutil.which("pdftotext")
    assert exe, "pdftotext (Debian poppler-utils) is needed"
    return subprocess.run([exe, *args], check=True, capture_output=True, text=True, timeout=60).stdout


def pdf_text(path: Path) -> str:
    """The whole document's text, without the bidi embedding marks pdftotext adds."""
    return _pdftotext(str(path), "-").translate(_BIDI_MARKS)


def arabic_column_text(path: Path, page: int = 1) -> str:
    """The text of the right-hand Arabic column of ``page``: the union of the lines holding
    Arabic in the right half of the page, below the banner, read as one region."""
    xhtml = _pdftotext("-bbox-layout", "-f", str(page), "-l", str(page), str(path), "-")
    root = ET.fromstring(xhtml)
    ns = {"x": "http://www.w3.org/1999/xhtml"}
    page_el = root.find(".//x:page", ns)
    assert page_el is not None
    width = float(page_el.get("width", "0"))
    boxes = []
    for line in root.iterfind(".//x:line", ns):
        text = "".join(w.text or "" for w in line.iterfind("x:word", ns))
        x0, y0, x1, y1 = (float(line.get(k, "0")) for k in ("xMin", "yMin", "xMax", "yMax"))
        if _ARABIC.search(text) and x0 >= width * 0.45:
            boxes.append((x0, y0, x1, y1))
    assert len(boxes) > 1, "no Arabic column found"
    boxes.sort(key=lambda b: b[1])
    boxes = boxes[1:]  # the first is the banner's Arabic half
    x0 = min(b[0] for b in boxes) - 2
    y0 = min(b[1] for b in boxes) - 2
    x1 = max(b[2] for b in boxes) + 2
    y1 = max(b[3] for b in boxes) + 2
    region = ["-r", "72", "-x", str(int(x0)), "-y", str(int(y0)), "-W", str(int(x1 - x0) + 1),
              "-H", str(int(y1 - y0) + 1), "-f", str(page), "-l", str(page)]
    return _pdftotext(*region, str(path), "-").translate(_BIDI_MARKS)


def letters(text: str) -> str:
    """Letters and digits only, in order (NFC): what 'logical order' is compared on, since
    pdftotext places neutral characters (spaces, full stops, brackets) by its own rules."""
    return "".join(ch for ch in unicodedata.normalize("NFC", text) if ch.isalnum())
