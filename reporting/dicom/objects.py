"""All DICOM objects of one draft at once, and their Part 10 bytes (what publishing writes)."""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite

from reporting.dicom.equipment import Equipment
from reporting.dicom.kos import build_kos
from reporting.dicom.pdf import build_encapsulated_pdf, render_report_pdf
from reporting.dicom.source import SourceAttributes
from reporting.dicom.sr import build_draft_sr
from reporting.draft import Draft


@dataclass(frozen=True)
class DraftObjects:
    """The draft SR, the report PDF (bytes and its Encapsulated PDF) and the KOS (``None`` when
    the draft has no key images: TID 2010 needs at least one)."""

    sr: Dataset
    pdf: bytes
    pdf_document: Dataset
    kos: Dataset | None


def build_draft_objects(draft: Draft, source: SourceAttributes, equipment: Equipment,
                        key_image_pngs: Mapping[str, bytes]) -> DraftObjects:
    """SR, PDF and KOS of ``draft`` (same draft, same UIDs and bytes)."""
    pdf = render_report_pdf(draft, source, key_image_pngs)
    return DraftObjects(
        sr=build_draft_sr(draft, source, equipment),
        pdf=pdf,
        pdf_document=build_encapsulated_pdf(draft, source, equipment, pdf),
        kos=build_kos(draft, source, equipment) if draft.key_images else None,
    )


def part10(ds: Dataset) -> bytes:
    """A dataset as a DICOM Part 10 file (preamble, file meta, explicit VR little endian)."""
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()
