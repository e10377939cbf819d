"""The bilingual consistency check on the DiagnosticReport, as an extension (pure).

R4 lets any element carry extensions (R4 extensibility.html); there is no core element for "the
translations agree", so the verdict rides on ``DiagnosticReport.extension`` under Taqrir's own
URL, with one sub-extension per mismatch (kind, section, concept, what each language says).
Consumers that do not know it ignore it, as R4 requires of non-modifier extensions.
"""

from __future__ import annotations

from typing import Any, Final

from reporting.consistency import ConsistencyResult
from reporting.labels import TAQRIR_URN

CONSISTENCY_URL: Final = f"{TAQRIR_URN}fhir:StructureDefinition:bilingual-consistency"


def consistency_extension(result: ConsistencyResult) -> dict[str, Any]:
    """``{"url": CONSISTENCY_URL, "extension": [status, checker, mismatch...]}``."""
    subs: list[dict[str, Any]] = [
        {"url": "status", "valueCode": "consistent" if result.consistent else "inconsistent"},
        {"url": "checker", "valueString": f"{result.checker_version}/{result.lexicon_version}"},
    ]
    for m in result.mismatches:
        parts: list[dict[str, Any]] = [
            {"url": "kind", "valueCode": m.kind},
            {"url": "section", "valueCode": m.section},
        ]
        for name, value in (("concept", m.concept), ("english", m.english), ("arabic", m.arabic),
                            ("detail", m.detail)):
            if value:
                parts.append({"url": name, "valueString": value})
        subs.append({"url": "mismatch", "extension": parts})
    return {"url": CONSISTENCY_URL, "extension": subs}


def consistency_of(report: dict[str, Any]) -> dict[str, Any] | None:
    """The extension back from a DiagnosticReport's JSON (None when absent)."""
    return next((e for e in report.get("extension", ()) if e.get("url") == CONSISTENCY_URL), None)
