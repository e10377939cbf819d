"""Errors of the DICOM integration, and their DIMSE statuses (PS3.4 Annex B.2.3), in one place."""

from __future__ import annotations

from ground.errors import TaqrirError, TransientError
from storage import StorageFailure


class DicomInputError(TaqrirError):
    """What a peer sent cannot be stored. ``status`` is the C-STORE failure status to answer."""

    status = 0xC210


class CannotUnderstand(DicomInputError):
    """The dataset cannot be parsed (0xC210 "Cannot understand")."""

    status = 0xC210


class IdentifiersMissing(DicomInputError):
    """The dataset lacks or contradicts the UIDs that identify it (0xA900 "Data Set does not match
    SOP Class"): no patient/study/series/instance can be filed without them."""

    status = 0xA900


class OutOfResources(TransientError):
    """Not enough free space to store safely (0xA700 "Out of resources"); retry later."""

    status = 0xA700


STATUS_OUT_OF_RESOURCES = 0xA700
"""Answered for a :class:`storage.StorageFailure` (the filesystem refused the write): the sender
should retry later."""


def refusal_status(err: DicomInputError | OutOfResources | StorageFailure) -> int:
    """The C-STORE failure status for a refused instance (PS3.4 Annex B.2.3)."""
    return STATUS_OUT_OF_RESOURCES if isinstance(err, StorageFailure) else err.status


STATUS_SUCCESS = 0x0000
STATUS_PROCESSING_FAILURE = 0x0110
