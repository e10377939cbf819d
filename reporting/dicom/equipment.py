"""Who made an object: Taqrir as the writing equipment, the model as the contributing algorithm.

IHE Radiology AI Results (AIR, rev. 1.2, 6.5.3.3 "Algorithm Identification") asks for the
algorithm twice: as TID 4019 content in the SR tree, and as an item of Contributing Equipment
Sequence (0018,A001) with purpose ``(Newcode1, 99IHE, "Processing Algorithm")``, Manufacturer,
Manufacturer's Model Name, Software Versions and a Device UID (0018,1002). The item is written
with plain pydicom (highdicom accepts DICOM purposes only).
"""

from __future__ import annotations

from datetime import UTC, datetime

from pydantic import BaseModel, ConfigDict, Field
from pydicom.dataset import Dataset

from reporting.dicom.concepts import PROCESSING_ALGORITHM
from reporting.dicom.uids import device_uid
from reporting.draft import ModelProvenance

LO_MAX = 64


class Equipment(BaseModel):
    """The writing equipment (General Equipment module, PS3.3 C.7.5.1) and site details."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    software_version: str = Field(description="Taqrir's version (the package version).")
    manufacturer: str = "Taqrir"
    model_name: str = "Taqrir research drafting"
    institution_name: str = Field("", description="Institution Name written on every object; empty: none.")


def lo(value: str) -> str:
    """A value cut to LO's 64 characters (PS3.5 6.2)."""
    return value[:LO_MAX]


def software_versions(equipment: Equipment, model: ModelProvenance) -> list[str]:
    """Software Versions of the algorithm: Taqrir's version and the model revision (LO each).

    The revision is cut to 60 characters (a ``sha256:`` hash is 71): LO holds 64, and a value
    ending a multi-valued element padded to even length reads back over the limit in pydicom. The
    full revision is the TID 4019 Algorithm Version in the SR.
    """
    return [lo(f"taqrir {equipment.software_version}"), model.model_revision[:60]]


def dicom_dt(value: datetime) -> tuple[str, str]:
    """(DA, TM) of an aware datetime, in UTC (the objects say so with Timezone Offset +0000)."""
    utc = value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
    return utc.strftime("%Y%m%d"), utc.strftime("%H%M%S.%f")


def algorithm_item(equipment: Equipment, model: ModelProvenance, contributed: datetime) -> Dataset:
    """The Contributing Equipment item of the drafting model (IHE AIR)."""
    item = Dataset()
    code = Dataset()
    code.CodeValue = PROCESSING_ALGORITHM.value
    code.CodingSchemeDesignator = PROCESSING_ALGORITHM.scheme_designator
    code.CodeMeaning = PROCESSING_ALGORITHM.meaning
    item.PurposeOfReferenceCodeSequence = [code]
    item.Manufacturer = lo(model.manufacturer)
    item.ManufacturerModelName = lo(model.model_name)
    item.SoftwareVersions = software_versions(equipment, model)
    item.DeviceUID = device_uid(model)
    da, tm = dicom_dt(contributed)
    item.ContributionDateTime = da + tm + "+0000"
    item.ContributionDescription = "AI draft of the report text (research use only, unverified)"
    return item
