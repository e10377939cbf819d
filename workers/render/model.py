"""The shapes that cross the edge of key-image rendering.

``InstanceInput`` mirrors one row of the listener's instance index, so the pipeline selects and
orders series without reading headers; ``KeyImage``, ``SeriesDecision`` and ``RenderedStudy`` are
what the rest of Taqrir (inference, reporting, audit) consumes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

#: VL Whole Slide Microscopy Image Storage (PS3.4 B.5).
WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"


@dataclass(frozen=True, slots=True)
class InstanceInput:
    """One stored instance, as the listener's index describes it (header values only)."""

    path: Path
    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    modality: str
    body_part: str
    series_description: str
    series_number: int | None
    image_type: tuple[str, ...]
    instance_number: int | None
    number_of_frames: int
    rows: int | None
    columns: int | None
    image_position_patient: tuple[float, float, float] | None
    image_orientation_patient: tuple[float, float, float, float, float, float] | None

    @property
    def is_image(self) -> bool:
        """True when the instance declares an image matrix (Rows and Columns, PS3.3 C.7.6.3)."""
        return bool(self.rows) and bool(self.columns)


class InstanceList(list[InstanceInput]):
    """A list of instances that also remembers which files were skipped and why."""

    def __init__(self, items: list[InstanceInput] | None = None) -> None:
        super().__init__(items or [])
        #: Files that could not be used, with the reason (no PHI: paths and error kinds only).
        self.skipped: list[tuple[Path, str]] = []


@dataclass(frozen=True, slots=True)
class KeyImage:
    """One rendered key image (PNG) with the provenance needed to audit it."""

    png: bytes
    width: int
    height: int
    series_instance_uid: str
    sop_instance_uids: tuple[str, ...]
    sop_class_uid: str
    frames: tuple[int, ...]
    label: str
    window: str | None
    sha256: str

    @classmethod
    def build(
        cls,
        *,
        png: bytes,
        width: int,
        height: int,
        series_instance_uid: str,
        sop_instance_uids: tuple[str, ...],
        sop_class_uid: str,
        frames: tuple[int, ...],
        label: str,
        window: str | None,
    ) -> KeyImage:
        """Build a key image, computing the SHA-256 of the PNG bytes."""
        return cls(
            png=png,
            width=width,
            height=height,
            series_instance_uid=series_instance_uid,
            sop_instance_uids=sop_instance_uids,
            sop_class_uid=sop_class_uid,
            frames=frames,
            label=label,
            window=window,
            sha256=hashlib.sha256(png).hexdigest(),
        )


@dataclass(frozen=True, slots=True)
class SeriesDecision:
    """Whether a series was chosen for rendering, and the rule that decided it."""

    series_instance_uid: str
    chosen: bool
    reason: str


@dataclass(slots=True)
class RenderedStudy:
    """Key images in presentation order, the per-series decisions and the series that failed."""

    key_images: list[KeyImage] = field(default_factory=list)
    decisions: list[SeriesDecision] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    #: Instances left out of a series that rendered or failed: (series, SOP Instance UID, reason).
    skipped: list[tuple[str, str, str]] = field(default_factory=list)
