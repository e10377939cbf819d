"""Research-only labels and disclaimers."""

from __future__ import annotations

from reporting.labels import DISCLAIMER, has_labels, security_labels, tags, with_labels


def test_with_labels_restores_removed_labels_and_keeps_others() -> None:
    other = {"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "R"}
    meta = with_labels({"security": [other], "tag": []})
    assert has_labels(meta)
    assert other in meta["security"]  # type: ignore[operator]
    assert with_labels(meta) == meta
    assert not has_labels({"security": security_labels()})
    assert has_labels({"security": security_labels(), "tag": tags()})


def test_disclaimers_in_both_languages() -> None:
    assert "NOT FOR CLINICAL USE" in DISCLAIMER["en"]
    assert "ليست للاستخدام السريري" in DISCLAIMER["ar"]
