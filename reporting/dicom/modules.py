"""The IOD modules every Taqrir object shares, written once (PS3.3 A.35 SR, A.45.1 PDF, A.35.4 KOS).

Patient (C.7.1.1), General Study (C.7.2.1) and Patient Study (C.7.2.2) repeat the source study
(:class:`~reporting.dicom.source.SourceAttributes`); the series is new (SR Document Series
C.17.1 / Encapsulated Document Series C.24.1 / Key Object Document Series C.17.6.1); General
Equipment (C.7.5.1) names Taqrir; SOP Common (C.12.1) says UTF-8 (``ISO_IR 192``, PS3.5 6.1.2.3)
and carries the algorithm's Contributing Equipment item. Dates are the draft's creation time in
UTC, with Timezone Offset From UTC ``+0000``, so that building twice gives the same bytes.
"""

from __future__ import annotations

from datetime import datetime

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian

from reporting.dicom.equipment import Equipment, algorithm_item, dicom_dt, lo
from reporting.dicom.source import SourceAttributes
from reporting.dicom.uids import ObjectUids
from reporting.draft import ModelProvenance

CHARSET = "ISO_IR 192"

#: What every series description starts with: viewers such as OHIF ignore Verification/
#: Preliminary flags, so the status has to be in words they do show, and the words that matter
#: first: OHIF v3's study browser cuts a series description after about 26 characters (it showed
#: "AI draft, unverified, rese..." when "research only" came last).
RESEARCH_LABEL = "Research only: unverified AI draft"


def new_object(
    *,
    sop_class_uid: str,
    uids: ObjectUids,
    source: SourceAttributes,
    modality: str,
    series_description: str,
    created: datetime,
    equipment: Equipment,
    model: ModelProvenance,
) -> Dataset:
    """A dataset with file meta, SOP Common, Patient/Study, series and equipment modules."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    meta.MediaStorageSOPInstanceUID = uids.sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = CHARSET
    da, tm = dicom_dt(created)
    ds.InstanceCreationDate = da
    ds.InstanceCreationTime = tm
    ds.SOPClassUID = UID(sop_class_uid)
    ds.SOPInstanceUID = uids.sop_instance_uid
    ds.TimezoneOffsetFromUTC = "+0000"
    source.apply(ds)
    ds.Modality = modality
    ds.SeriesInstanceUID = uids.series_instance_uid
    ds.SeriesNumber = uids.series_number
    ds.SeriesDate = da
    ds.SeriesTime = tm
    ds.SeriesDescription = lo(series_description)
    ds.Manufacturer = lo(equipment.manufacturer)
    ds.ManufacturerModelName = lo(equipment.model_name)
    ds.SoftwareVersions = lo(f"taqrir {equipment.software_version}")
    if equipment.institution_name:
        ds.InstitutionName = lo(equipment.institution_name)
    ds.ContributingEquipmentSequence = [algorithm_item(equipment, model, created)]
    ds.InstanceNumber = 1
    ds.ContentDate = da
    ds.ContentTime = tm
    return ds
