"""Coded concepts the objects use, each with the part of the standard it comes from."""

from __future__ import annotations

from typing import Final

from pydicom.sr.coding import Code

from reporting.draft import Language

#: PS3.16 TID 2000 root: LOINC 18748-4 "Diagnostic Imaging Report" (CID 7000).
DIAGNOSTIC_IMAGING_REPORT: Final = Code("18748-4", "LN", "Diagnostic Imaging Report")
#: TID 2000 sections (CID 7001) and the TEXT concepts of TID 2002 "Report Narrative".
FINDINGS: Final = Code("121070", "DCM", "Findings")
FINDING: Final = Code("121071", "DCM", "Finding")
IMPRESSIONS: Final = Code("121072", "DCM", "Impressions")
IMPRESSION: Final = Code("121073", "DCM", "Impression")
#: Free-text remark (CID 7003 allows it in TID 2002): the research-only disclaimer and the review note.
COMMENT: Final = Code("121106", "DCM", "Comment")
#: TID 1204 "Language of Content Item and Descendants", values from RFC 5646 (CID 5000).
LANGUAGE_OF_CONTENT: Final = Code("121049", "DCM", "Language of Content Item and Descendants")
LANGUAGE: Final[dict[Language, Code]] = {
    "en": Code("en", "RFC5646", "English"),
    "ar": Code("ar", "RFC5646", "Arabic"),
}
#: TID 2010 document title (CID 7010).
OF_INTEREST: Final = Code("113000", "DCM", "Of Interest")
#: IHE Radiology AI Results (AIR) 6.5.3.3: Purpose of Reference of the algorithm's Contributing
#: Equipment item. A private (99IHE) code, which is why highdicom's ContributingEquipment, limited
#: to DICOM purposes, is not used for it.
PROCESSING_ALGORITHM: Final = Code("Newcode1", "99IHE", "Processing Algorithm")
#: Encapsulated PDF document concept (PS3.3 C.24.2, CID 7020 allows LOINC report titles).
REPORT_DOCUMENT: Final = DIAGNOSTIC_IMAGING_REPORT
