"""FHIR R4 builders: a :class:`~reporting.draft.Draft` in, resources out, no I/O.

The models are fhir.resources' R4B classes, used only where their JSON is R4-valid (the elements
used here are identical in R4 and R4B); the tests check every resource against the official R4
JSON schema as well.
"""

from reporting.fhir.bundle import DraftResources, build_resources
from reporting.fhir.review import (
    Review,
    ReviewAction,
    build_review_provenance,
    build_reviewed_report,
)

__all__ = [
    "DraftResources",
    "Review",
    "ReviewAction",
    "build_resources",
    "build_review_provenance",
    "build_reviewed_report",
]
