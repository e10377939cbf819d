"""Errors of the DICOM object builders (bad input a builder cannot make a valid object from)."""

from __future__ import annotations

from ground.errors import PermanentError


class DicomObjectError(PermanentError):
    """The input cannot become a valid DICOM object; the message says which input and what to do.

    Permanent: building the same draft again gives the same answer.
    """


class PdfRendererMissing(DicomObjectError):
    """WeasyPrint cannot run on this host (its Pango, HarfBuzz and FriBidi libraries are missing):
    no report PDF can be made until they are installed; the SR and KOS do not need them."""


class NoKeyImages(DicomObjectError):
    """A Key Object Selection needs at least one image (PS3.16 TID 2010, row 5: 1-n)."""


class UnknownSopClass(DicomObjectError):
    """A key image's SOP Class is unknown, so no reference to it can be written (PS3.3 C.17.2)."""
