"""UIDs of the objects Taqrir writes, derived from stable inputs (PS3.5 9.1, B.2 "2.25." UUIDs).

The same draft always gives the same Series and SOP Instance UIDs, so building and sending it
again delivers the same instance (a PACS replaces or ignores it) instead of a duplicate. The
Device UID of the drafting model changes exactly when its name or checkpoint revision does
(IHE AI Results, Contributing Equipment). The UID is a name-based (RFC 9562 version 5) UUID of
the parts under the ``2.25`` root (PS3.5 B.2), so no registered root is needed. (pydicom's
``generate_uid(prefix=None, entropy_srcs=...)`` ignores the sources and returns a random UUID.)
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Literal

from pydicom.uid import UID

from reporting.draft import Draft, ModelProvenance

ObjectKind = Literal["sr", "pdf", "kos", "verified-sr"]

_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:taqrir:dicom")


def derived_uid(*parts: str) -> UID:
    """A ``2.25.`` UID that depends only on ``parts`` (at most 44 characters)."""
    return UID(f"2.25.{uuid.uuid5(_NAMESPACE, chr(0).join(parts)).int}")


@dataclass(frozen=True)
class ObjectUids:
    """Series and instance UID of one object of one draft, and its Series Number."""

    series_instance_uid: UID
    sop_instance_uid: UID
    series_number: int


#: Series Numbers of Taqrir's series (PS3.3 C.7.3.1, IS, only needs to be unique in the study
#: by convention): high numbers keep them after the acquired series in a viewer's list.
SERIES_NUMBERS: dict[ObjectKind, int] = {"sr": 9901, "pdf": 9902, "kos": 9903, "verified-sr": 9904}


def object_uids(draft: Draft, kind: ObjectKind, revision: str = "") -> ObjectUids:
    """UIDs of ``kind`` for ``draft``. ``revision`` tells verified revisions apart (one per review)."""
    return ObjectUids(
        series_instance_uid=derived_uid("series", kind, draft.draft_id),
        sop_instance_uid=derived_uid("instance", kind, draft.draft_id, revision),
        series_number=SERIES_NUMBERS[kind],
    )


def device_uid(model: ModelProvenance) -> UID:
    """Device UID of the drafting model: one per model name and checkpoint revision."""
    return derived_uid("device", model.manufacturer, model.model_name, model.model_revision)
