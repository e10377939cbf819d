"""Geometric slice ordering and representative-slice choice, from header values only.

Slices are ordered by the projection of Image Position (Patient) on the slice normal, the cross
product of the row and column direction cosines of Image Orientation (Patient) (PS3.3 C.7.6.2.1.1).
Instance Number is only a tie-breaker or a last resort: PS3.3 C.7.6.1.1 gives it no spatial meaning.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .model import InstanceInput

logger = logging.getLogger(__name__)

#: Positions closer than this (mm) along the normal are the same slice location.
_SAME_POSITION_MM = 1e-3


def slice_normal(iop: Sequence[float]) -> np.ndarray:
    """Unit normal of an image plane from its six direction cosines (row x column)."""
    if len(iop) != 6:
        raise ValueError(f"Image Orientation (Patient) needs 6 values, got {len(iop)}")
    row = np.asarray(iop[:3], dtype=float)
    col = np.asarray(iop[3:], dtype=float)
    normal = np.cross(row, col)
    norm = float(np.linalg.norm(normal))
    if norm < 1e-6:
        raise ValueError("Image Orientation (Patient) row and column cosines are parallel")
    return normal / norm


def _orientation_key(iop: Sequence[float]) -> tuple[float, ...]:
    return tuple(round(float(v), 3) for v in iop)


def plane_name(iop: Sequence[float] | None) -> str:
    """'axial', 'coronal' or 'sagittal' from the dominant axis of the normal ('' when unknown)."""
    if iop is None:
        return ""
    try:
        n = np.abs(slice_normal(iop))
    except ValueError:
        return ""
    return ("sagittal", "coronal", "axial")[int(np.argmax(n))]


@dataclass(frozen=True, slots=True)
class OrderedSlice:
    """One slice in geometric order: which instance, which frame (0-based), where along the normal."""

    instance: InstanceInput
    frame: int
    position: float | None


@dataclass(frozen=True, slots=True)
class Ordering:
    """Slices in order and how the order was obtained (recorded in logs and labels)."""

    slices: tuple[OrderedSlice, ...]
    method: str
    plane: str


def _instance_key(i: InstanceInput) -> tuple[int, int, str]:
    return (i.instance_number is None, i.instance_number or 0, i.sop_instance_uid)


def order_instances(instances: Sequence[InstanceInput]) -> Ordering:
    """Order the single-frame instances of a series along the slice normal.

    When orientations differ (e.g. a three-plane series) the largest group of parallel slices is
    used. Without complete geometry the order falls back to Instance Number.
    """
    if not instances:
        raise ValueError("no instances to order")
    with_geometry = [
        i for i in instances if i.image_position_patient is not None and i.image_orientation_patient
    ]
    if len(with_geometry) < len(instances) or len(instances) == 1:
        ordered = sorted(instances, key=_instance_key)
        plane = plane_name(ordered[0].image_orientation_patient)
        return Ordering(
            tuple(OrderedSlice(i, 0, None) for i in ordered),
            "instance number (Image Position/Orientation (Patient) incomplete)"
            if len(instances) > 1
            else "single instance",
            plane,
        )
    iops = np.round(
        np.asarray([i.image_orientation_patient for i in with_geometry], dtype=float), 3
    )
    if bool((iops == iops[0]).all()):  # the usual case: one orientation
        keys = iops[:1]
        in_group = np.arange(len(with_geometry))
        main = 0
    else:
        keys, inverse, counts = np.unique(iops, axis=0, return_inverse=True, return_counts=True)
        main = int(np.argmax(counts))
        in_group = np.flatnonzero(inverse.reshape(-1) == main)
    key = tuple(float(v) for v in keys[main])
    normal = slice_normal(key)
    ipps = np.asarray([with_geometry[j].image_position_patient for j in in_group], dtype=float)
    positions = ipps @ normal
    group = [with_geometry[j] for j in in_group]
    numbers = np.asarray(
        [i.instance_number if i.instance_number is not None else 1 << 30 for i in group]
    )
    order = np.lexsort((numbers, positions))
    method = "Image Position (Patient) along the slice normal"
    if len(keys) > 1:
        method += f" ({len(group)} of {len(instances)} instances share the main orientation)"
    return Ordering(
        tuple(OrderedSlice(group[j], 0, float(positions[j])) for j in order),
        method,
        plane_name(key),
    )


def distinct_positions(slices: Sequence[OrderedSlice]) -> list[OrderedSlice]:
    """Keep the first slice at each location (repeated acquisitions at one position collapse)."""
    out: list[OrderedSlice] = []
    for s in slices:
        if (
            out
            and s.position is not None
            and out[-1].position is not None
            and abs(s.position - out[-1].position) < _SAME_POSITION_MM
        ):
            continue
        out.append(s)
    return out


def pick_representatives(positions: Sequence[float | None], count: int) -> list[int]:
    """Indices of ``count`` slices spread evenly over the covered distance (or over the index range).

    Targets sit at the centres of ``count`` equal segments of [first, last] position, so the ends
    of the volume (often partial-volume slices) are avoided and uneven spacing is respected.
    """
    n = len(positions)
    if count <= 0 or n == 0:
        return []
    if n <= count:
        return list(range(n))
    fractions = [(k + 0.5) / count for k in range(count)]
    known = [p for p in positions if p is not None]
    chosen: list[int] = []
    if len(known) == n and known[-1] != known[0]:
        arr = np.asarray(known, dtype=float)
        lo, hi = float(arr[0]), float(arr[-1])
        for f in fractions:
            target = lo + f * (hi - lo)
            order = np.argsort(np.abs(arr - target), kind="stable")
            pick = next(int(i) for i in order if int(i) not in chosen)
            chosen.append(pick)
    else:
        for f in fractions:
            idx = min(int(f * n), n - 1)
            while idx in chosen:
                idx = (idx + 1) % n
            chosen.append(idx)
    return sorted(chosen)


def _frame_plane(
    ds: object, index: int
) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """Image Position/Orientation (Patient) of one frame from the functional groups (PS3.3 C.7.6.16.2.3-4)."""
    position: tuple[float, ...] | None = None
    orientation: tuple[float, ...] | None = None
    groups = []
    shared = getattr(ds, "SharedFunctionalGroupsSequence", None)
    if shared:
        groups.append(shared[0])
    per_frame = getattr(ds, "PerFrameFunctionalGroupsSequence", None)
    if per_frame and index < len(per_frame):
        groups.append(per_frame[index])
    for group in groups:
        pos = group.get("PlanePositionSequence")
        if pos and "ImagePositionPatient" in pos[0]:
            position = tuple(float(v) for v in pos[0].ImagePositionPatient)
        ori = group.get("PlaneOrientationSequence")
        if ori and "ImageOrientationPatient" in ori[0]:
            orientation = tuple(float(v) for v in ori[0].ImageOrientationPatient)
    return position, orientation


def order_frames(ds: object, instance: InstanceInput) -> Ordering | None:
    """Geometric order of the frames of an enhanced multi-frame instance, or None without geometry.

    Returns None when frames lack Plane Position/Orientation or all sit at one location (a
    temporal or cine acquisition, which is rendered as representative frames instead).
    """
    count = instance.number_of_frames
    planes = [_frame_plane(ds, i) for i in range(count)]
    if any(p is None or o is None or len(p) != 3 or len(o) != 6 for p, o in planes):
        return None
    groups = Counter(_orientation_key(o or ()) for _, o in planes)
    key, _ = groups.most_common(1)[0]
    normal = slice_normal(key)
    scored = sorted(
        (
            (float(np.dot(normal, p or (0.0, 0.0, 0.0))), i)
            for i, (p, o) in enumerate(planes)
            if _orientation_key(o or ()) == key
        ),
    )
    if scored[-1][0] - scored[0][0] < _SAME_POSITION_MM:
        return None
    method = "Plane Position Sequence along the slice normal (per-frame functional groups)"
    return Ordering(
        tuple(OrderedSlice(instance, i, pos) for pos, i in scored), method, plane_name(key)
    )
