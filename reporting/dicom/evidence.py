"""References to the key images: Current Requested Procedure Evidence (PS3.3 C.17.2.2) and the
hierarchical SOP instance references shared by the SR and the KOS."""

from __future__ import annotations

from pydicom.dataset import Dataset

from reporting.dicom.errors import UnknownSopClass
from reporting.draft import Draft


def key_instances(draft: Draft) -> list[tuple[str, str, str, tuple[int, ...]]]:
    """``(series UID, SOP class UID, SOP instance UID, frames)`` of every key image, in order,
    each instance once. A key image without a SOP class takes its series' only class."""
    classes = {s.series_instance_uid: s.sop_class_uids for s in draft.study.series}
    out: list[tuple[str, str, str, tuple[int, ...]]] = []
    seen: set[str] = set()
    for ki in draft.key_images:
        sop_class = ki.sop_class_uid
        if not sop_class:
            known = classes.get(ki.series_instance_uid, ())
            if len(known) != 1:
                raise UnknownSopClass(
                    f"key image {ki.label!r} of series {ki.series_instance_uid} has no SOP Class UID and its "
                    f"series has {len(known)} classes; re-render the study so the manifest records it"
                )
            sop_class = known[0]
        for uid in ki.sop_instance_uids:
            if uid in seen:
                continue
            seen.add(uid)
            out.append((ki.series_instance_uid, sop_class, uid, ki.frames if len(ki.sop_instance_uids) == 1 else ()))
    return out


def evidence_sequence(draft: Draft) -> list[Dataset]:
    """One study item listing the key images by series (empty when there are none)."""
    series: dict[str, list[Dataset]] = {}
    for series_uid, sop_class, sop_uid, _frames in key_instances(draft):
        ref = Dataset()
        ref.ReferencedSOPClassUID = sop_class
        ref.ReferencedSOPInstanceUID = sop_uid
        series.setdefault(series_uid, []).append(ref)
    if not series:
        return []
    study = Dataset()
    study.StudyInstanceUID = draft.study.study_instance_uid
    study.ReferencedSeriesSequence = []
    for series_uid, refs in series.items():
        item = Dataset()
        item.SeriesInstanceUID = series_uid
        item.ReferencedSOPSequence = refs
        study.ReferencedSeriesSequence.append(item)
    return [study]
