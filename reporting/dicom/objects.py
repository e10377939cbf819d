"""All DICOM objects of one draft at once, and their Part 10 bytes (what publishing writes)."""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite

from reporting.dicom.equipment import Equipment
from reporting.dicom.errors import PdfRendererMissing
from reporting.dicom.kos import build_kos
from reporting.dicom.pdf import build_encapsulated_pdf, render_report_pdf
from reporting.dicom.source import SourceAttributes
from reporting.dicom.sr import build_draft_sr
from reporting.draft import Draft


@dataclass(frozen=True)
class DraftObjects:
    """The draft SR, the report PDF (bytes and its Encapsulated PDF) and the KOS (``None`` when
    the draft has no key images: TID 2010 needs at least one).

    The PDF is ``None`` with ``pdf_skipped`` saying why when this host cannot render one (no
    Pango for WeasyPrint): the SR carries the same text, so a missing library costs the PDF only,
    not the draft's other objects. Any other PDF error is raised."""

    sr: Dataset
    pdf: bytes | None
    pdf_document: Dataset | None
    kos: Dataset | None
    pdf_skipped: str | None = None


def build_draft_objects(draft: Draft, source: SourceAttributes, equipment: Equipment,
                        key_image_pngs: Mapping[str, bytes]) -> DraftObjects:
    """SR, PDF and KOS of ``draft`` (same draft, same UIDs and bytes)."""
    pdf: bytes | None = None
    skipped: str | None = None
    try:
        pdf = render_report_pdf(draft, source, key_image_pngs)
    except PdfRendererMissing as err:
        skipped = str(err)
    return DraftObjects(
        sr=build_draft_sr(draft, source, equipment),
        pdf=pdf,
        pdf_document=build_encapsulated_pdf(draft, source, equipment, pdf) if pdf is not None else None,
        kos=build_kos(draft, source, equipment) if draft.key_images else None,
        pdf_skipped=skipped,
    )


def part10(ds: Dataset) -> bytes:
    """A dataset as a DICOM Part 10 file (preamble, file meta, explicit VR little endian)."""
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()
