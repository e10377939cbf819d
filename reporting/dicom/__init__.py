"""DICOM object builders: a :class:`~reporting.draft.Draft` in, pydicom datasets or bytes out, no I/O.

* :func:`build_draft_sr` - the draft as an Enhanced SR with a TID 2000 tree (``sr.py``)
* :func:`render_report_pdf` / :func:`build_encapsulated_pdf` - the one-page bilingual PDF and its
  Encapsulated PDF wrapper (``pdf.py``)
* :func:`build_kos` - the key images as a Key Object Selection (``kos.py``)
* :func:`build_verified_sr` - a clinician's verified revision (``verified.py``)
* :class:`SourceAttributes` - the source study's patient/study attributes (``source.py``)
* :func:`build_draft_objects` - all three at once; :func:`part10` - a dataset's file bytes
* UIDs derive from the draft id (``uids.py``): rebuilding gives the same instances.
"""

from reporting.dicom.equipment import Equipment
from reporting.dicom.errors import DicomObjectError, NoKeyImages, UnknownSopClass
from reporting.dicom.kos import build_kos
from reporting.dicom.objects import DraftObjects, build_draft_objects, part10
from reporting.dicom.pdf import build_encapsulated_pdf, render_report_pdf
from reporting.dicom.source import SourceAttributes
from reporting.dicom.sr import build_draft_sr
from reporting.dicom.uids import ObjectUids, device_uid, object_uids
from reporting.dicom.verified import Verification, build_verified_sr

__all__ = [
    "DicomObjectError",
    "DraftObjects",
    "Equipment",
    "NoKeyImages",
    "ObjectUids",
    "SourceAttributes",
    "UnknownSopClass",
    "Verification",
    "build_draft_objects",
    "build_draft_sr",
    "build_encapsulated_pdf",
    "build_kos",
    "build_verified_sr",
    "device_uid",
    "object_uids",
    "part10",
    "render_report_pdf",
]
