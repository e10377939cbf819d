"""The key images as a Key Object Selection document (PS3.3 A.35.4, PS3.16 TID 2010).

Title ``(113000, DCM, "Of Interest")``, one IMAGE reference per key image (with its frame
numbers for multi-frame images, when they say more than "frame 1"), the drafting model as the device observer, and a Key Object
Description saying these are the images an AI draft was made from (research only). Weasis and
other viewers apply KOS documents as a filter; OHIF lists it but does not apply it.

Built with highdicom's ``ko`` package. It takes the referenced images as datasets to copy
patient/study attributes and references from; the builder hands it small in-memory stand-ins
made of the key images' UIDs and the source attributes (no image is read), then sets the
document's dates from the draft so that rebuilding gives the same bytes.
"""

from __future__ import annotations

import warnings
from typing import Final

from highdicom.ko import KeyObjectSelection, KeyObjectSelectionDocument
from highdicom.sr import DeviceObserverIdentifyingAttributes, ObserverContext
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import KeyObjectSelectionDocumentStorage

from reporting.dicom.concepts import OF_INTEREST
from reporting.dicom.equipment import Equipment, algorithm_item, dicom_dt, lo
from reporting.dicom.errors import NoKeyImages
from reporting.dicom.evidence import key_instances
from reporting.dicom.modules import CHARSET, RESEARCH_LABEL, new_object
from reporting.dicom.source import SourceAttributes
from reporting.dicom.uids import ObjectUids, device_uid, object_uids
from reporting.draft import Draft

KOS_SOP_CLASS: Final = str(KeyObjectSelectionDocumentStorage)
KOS_SERIES_DESCRIPTION: Final = f"{RESEARCH_LABEL} - key images"
KOS_DESCRIPTION: Final = (
    "Key images an AI research draft was made from (unverified, research only, not for clinical use)."
)


def _stand_in(source: SourceAttributes, series_uid: str, sop_class: str, sop_uid: str) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = CHARSET
    source.apply(ds)
    ds.SeriesInstanceUID = series_uid
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.Rows = ds.Columns = 1  # marks an image: highdicom then writes an IMAGE item, not COMPOSITE
    return ds


def _document(evidence: list[Dataset], content: KeyObjectSelection, uids: ObjectUids,
              equipment: Equipment) -> KeyObjectSelectionDocument:
    return KeyObjectSelectionDocument(
        evidence=evidence, content=content, series_instance_uid=uids.series_instance_uid,
        series_number=uids.series_number, sop_instance_uid=uids.sop_instance_uid, instance_number=1,
        manufacturer=lo(equipment.manufacturer),
        institution_name=lo(equipment.institution_name) if equipment.institution_name else None,
        specific_character_set=CHARSET,
    )


def build_kos(draft: Draft, source: SourceAttributes, equipment: Equipment) -> Dataset:
    """The KOS of the draft's key images. :class:`NoKeyImages` when the draft has none."""
    instances = key_instances(draft)
    if not instances:
        raise NoKeyImages(f"draft {draft.draft_id} has no key images: no Key Object Selection is written for it")
    evidence = [_stand_in(source, series, sop_class, sop) for series, sop_class, sop, _ in instances]
    device = DeviceObserverIdentifyingAttributes(
        uid=device_uid(draft.model), name=lo(draft.model.model_name),
        manufacturer_name=lo(draft.model.manufacturer), model_name=lo(draft.model.model_name),
    )
    content = KeyObjectSelection(
        document_title=OF_INTEREST,
        referenced_objects=evidence,
        observer_device_context=ObserverContext(observer_type=codes.DCM.Device,
                                                observer_identifying_attributes=device),
        description=KOS_DESCRIPTION,
    )
    uids = object_uids(draft, "kos")
    with warnings.catch_warnings():
        # highdicom warns about single-component person names; the source's name is copied as is
        warnings.simplefilter("ignore", UserWarning)
        document = _document(evidence, content, uids, equipment)
    base = new_object(
sop_class_uid=KOS_SOP_CLASS, uids=uids, source=source, modality="KO",
                      series_description=KOS_SERIES_DESCRIPTION, created=draft.created_at,
                      equipment=equipment, model=draft.model)
    # Our own modules over highdicom's (same patient/study values; deterministic dates, the
    # research label, the algorithm as contributing equipment).
    for element in base:
        if element.keyword != "InstanceNumber":
            document[element.tag] = element
    document.file_meta = base.file_meta
    for item in document.ContentSequence:
        if item.ValueType != "IMAGE":
            continue
        ref = item.ReferencedSOPSequence[0]
        frames = next((f for _, _, sop, f in instances if sop == ref.ReferencedSOPInstanceUID), ())
        if frames and frames != (1,):
            # frames=(1,) is what the renderer records for single-frame images too, where a
            # frame number is not allowed (PS3.3 C.18.3.1.3); a whole-image reference covers it
            ref.ReferencedFrameNumber = list(frames)
    out = Dataset(document)
    da, tm = dicom_dt(draft.created_at)
    out.ContentDate, out.ContentTime = da, tm
    out.ContributingEquipmentSequence = [algorithm_item(equipment, draft.model, draft.created_at)]
    out.file_meta = base.file_meta
    return out
