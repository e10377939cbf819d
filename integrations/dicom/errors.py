"""Errors of the DICOM integration, and their DIMSE statuses (PS3.4 Annex B.2.3), in one place."""

from __future__ import annotations

from ground.errors import TaqrirError, TransientError


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


class StorageFailure(TransientError):
    """The filesystem or database refused the write (0xA700: the sender should retry later)."""

    status = 0xA700


STATUS_SUCCESS = 0x0000
STATUS_PROCESSING_FAILURE = 0x0110
