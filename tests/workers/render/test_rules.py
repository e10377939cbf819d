"""Series selection rules: the default YAML, an admin's own file, and validation messages."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from workers.render import instances_from_files, render_study
from workers.render.errors import RulesError
from workers.render.model import InstanceInput
from workers.render.rules import SeriesSummary, load_rules, select_series
from workers.render_config import RenderSettings


@pytest.fixture
def ct(corpus: Path) -> InstanceInput:
    return instances_from_files([corpus / "ct/series_dcmqi_ct3slice/01.dcm"])[0]


def series(base: InstanceInput, uid: str, count: int = 1, **changes: object) -> list[InstanceInput]:
    """``count`` instances of a series made from a real header with some fields changed."""
    return [
        dataclasses.replace(
            base,
            series_instance_uid=uid,
            sop_instance_uid=f"{uid}.{n}",
            instance_number=n,
            **changes,
        )  # type: ignore[arg-type]
        for n in range(1, count + 1)
    ]


def decide(
    *groups: list[InstanceInput], rules_file: Path | None = None
) -> tuple[list[str], dict[str, str]]:
    selection = select_series([SeriesSummary.of(g) for g in groups], load_rules(rules_file))
    return [s.series_instance_uid for s in selection.candidates], {
        uid: d.reason for uid, d in selection.decisions.items()
    }


def test_default_rules_skip_non_diagnostic_series(ct: InstanceInput) -> None:
    chosen, skipped = decide(
        series(ct, "1.1", 40),
        series(ct, "1.2", 1, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")),
        series(ct, "1.3", 1, series_description="Topogram 0.6 T20f"),
        series(
            ct,
            "1.4",
            1,
            series_description="Dose Report",
            image_type=("DERIVED", "SECONDARY", "OTHER"),
        ),
        series(
            ct,
            "1.5",
            1,
            modality="SR",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.88.22",
            rows=None,
            columns=None,
        ),
        series(ct, "1.6", 3, modality="SEG", sop_class_uid="1.2.840.10008.5.1.4.1.1.66.4"),
        series(
            ct,
            "1.7",
            1,
            modality="RTSTRUCT",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.481.3",
            rows=None,
            columns=None,
        ),
        series(ct, "1.8", 60, image_type=("DERIVED", "SECONDARY", "MPR")),
        series(
            ct, "1.9", 1, modality="OT", sop_class_uid="1.2.840.10008.5.1.4.1.1.7", image_type=()
        ),
        series(ct, "1.10", 1, modality="ECG", rows=None, columns=None),
    )
    assert chosen == ["1.1"]
    assert "localizer" in skipped["1.2"] and "localizer" in skipped["1.3"]
    assert "dose" in skipped["1.4"]
    assert "structured report" in skipped["1.5"]
    assert "segmentation" in skipped["1.6"]
    assert "radiotherapy" in skipped["1.7"]
    assert (
        "an original series exists" in skipped["1.8"]
        and "an original series exists" in skipped["1.9"]
    )
    assert "no image matrix" in skipped["1.10"]


def test_derived_series_are_used_when_nothing_original_exists(ct: InstanceInput) -> None:
    chosen, _ = decide(series(ct, "2.1", 5, image_type=("DERIVED", "SECONDARY", "MPR")))
    assert chosen == ["2.1"]


def test_ranking_prefers_original_primary_then_most_images(ct: InstanceInput) -> None:
    chosen, _ = decide(
        series(ct, "3.1", 20),
        series(ct, "3.2", 200),
        series(ct, "3.3", 500, image_type=("ORIGINAL",)),  # not PRIMARY: ranked after
    )
    assert chosen == ["3.2", "3.1", "3.3"]


def test_render_records_why_each_series_was_chosen_or_not(corpus: Path) -> None:
    wrist = instances_from_files(sorted((corpus / "mr/series_dcm4che_wrist").glob("*.dcm")))
    ct3 = instances_from_files(sorted((corpus / "ct/series_dcmqi_ct3slice").glob("*.dcm")))
    rendered = render_study([*ct3, *wrist], RenderSettings(max_series=1))
    reasons = {d.series_instance_uid: d for d in rendered.decisions}
    mr_uid, ct_uid = wrist[0].series_instance_uid, ct3[0].series_instance_uid
    assert (
        reasons[mr_uid].chosen
        and "rank 1" in reasons[mr_uid].reason
        and "16 instance(s)" in reasons[mr_uid].reason
    )
    assert not reasons[ct_uid].chosen and "max_series=1" in reasons[ct_uid].reason
    assert {k.series_instance_uid for k in rendered.key_images} == {mr_uid}


CUSTOM = """
version: 1
rules:
  - name: no-mr
    action: skip
    reason: MR not wanted here
    when:
      all:
        - modality: MR
        - number_of_images: {min: 2}
  - name: ct-first
    action: keep
    priority: 10
    reason: CT preferred
    when: {modality: [CT], series_description: '(?i)^$|.*', not: {image_type: LOCALIZER}}
  - name: rest
    action: keep
    when: {any: [{is_image: true}, {sop_class: ['1.2.840.10008.5.1.4.1.1.*']}]}
"""


def test_custom_rules_file(tmp_path: Path, corpus: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(CUSTOM, "utf-8")
    wrist = instances_from_files(sorted((corpus / "mr/series_dcm4che_wrist").glob("*.dcm")))
    ct3 = instances_from_files(sorted((corpus / "ct/series_dcmqi_ct3slice").glob("*.dcm")))
    rendered = render_study([*wrist, *ct3], RenderSettings(rules_file=rules))
    decisions = {d.series_instance_uid: d for d in rendered.decisions}
    assert not decisions[wrist[0].series_instance_uid].chosen
    assert "MR not wanted here" in decisions[wrist[0].series_instance_uid].reason
    assert "'ct-first'" in decisions[ct3[0].series_instance_uid].reason
    # the file is re-read when edited
    rules.write_text(CUSTOM.replace("modality: MR", "modality: XA"), "utf-8")
    rendered = render_study([*wrist, *ct3], RenderSettings(rules_file=rules))
    assert {d.series_instance_uid for d in rendered.decisions if d.chosen} == {
        wrist[0].series_instance_uid,
        ct3[0].series_instance_uid,
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("rules: []", "non-empty list"),
        ("[1, 2]", "top level must be a mapping"),
        (
            "version: 2\nrules: [{name: a, action: keep, when: {is_image: true}}]",
            "unsupported rules version",
        ),
        ("rules: [{name: a, action: drop, when: {is_image: true}}]", "'action' must be one of"),
        ("rules: [{name: a, action: keep, when: {colour: red}}]", "unknown condition key"),
        (
            "rules: [{name: a, action: keep, when: {series_description: '(['}}]",
            "invalid regular expression",
        ),
        (
            "rules: [{name: a, action: keep, when: {number_of_images: {least: 2}}}]",
            "'min' and/or 'max'",
        ),
        (
            "rules: [{name: a, action: keep, when: {is_image: yes please}}]",
            "expected true or false",
        ),
        ("rules: [{name: a, action: keep, when: {any: []}}]", "non-empty list of conditions"),
        ("rules: [{name: a, action: keep, extra: 1, when: {is_image: true}}]", "unknown keys"),
        ("rules: [{action: keep, when: {is_image: true}}]", "'name' must be"),
        ("rules: {", "invalid YAML"),
    ],
)
def test_invalid_rules_are_refused_with_a_precise_message(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text, "utf-8")
    with pytest.raises(RulesError, match=message):
        load_rules(path)


def test_missing_rules_file(tmp_path: Path) -> None:
    with pytest.raises(RulesError, match="cannot read rules file"):
        load_rules(tmp_path / "absent.yaml")


def test_built_in_rules_load() -> None:
    rules = load_rules(None)
    assert rules.rules[-1].action == "keep" and "default_rules.yaml" in rules.source
