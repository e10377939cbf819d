"""The draft SR: TID 2000 tree, flags, labels, UIDs, dciodvfy, read back."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from reporting.dicom import Equipment, SourceAttributes, build_draft_sr, device_uid, object_uids
from reporting.dicom.sr import FINDING_LINE_CHARS, finding_lines
from reporting.draft import Sections
from reporting.labels import DISCLAIMER
from tests.factories.drafts import ARABIC_NAME, SECTIONS, draft_from_dicom, sample_draft
from tests.reporting.dicom.checks import dciodvfy_errors, write_and_read

EQUIPMENT = Equipment(software_version="0.1.0")


def _code(item: Dataset) -> tuple[str, str]:
    c = item.ConceptNameCodeSequence[0]
    return str(c.CodeValue), str(c.CodingSchemeDesignator)


def _language(item: Dataset) -> str | None:
    for child in item.get("ContentSequence", []):
        if _code(child) == ("121049", "DCM"):
            return str(child.ConceptCodeSequence[0].CodeValue)
    return None


def _plain(value: object) -> str:
    """A TEXT value without the right-to-left isolate marks the SR puts around Arabic."""
    return str(value).removeprefix("\u2067").removesuffix("\u2069")


def _texts(item: Dataset, code: str) -> list[str]:
    return [_plain(c.TextValue) for c in item.ContentSequence if c.ValueType == "TEXT" and _code(c)[0] == code]


def test_draft_sr_tree_flags_and_labels(tmp_path: Path) -> None:
    draft = sample_draft()
    source = SourceAttributes.from_study_ref(draft.study)
    ds = write_and_read(build_draft_sr(draft, source, EQUIPMENT), tmp_path / "sr.dcm")
    assert dciodvfy_errors(tmp_path / "sr.dcm") == []
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.22"  # Enhanced SR
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert (ds.VerificationFlag, ds.CompletionFlag, ds.PreliminaryFlag) == ("UNVERIFIED", "PARTIAL", "PRELIMINARY")
    assert ds.Modality == "SR"
    assert ds.SeriesDescription.startswith("Research only: unverified AI draft")
    assert ds.StudyInstanceUID == draft.study.study_instance_uid
    assert ds.SeriesInstanceUID not in {s.series_instance_uid for s in draft.study.series}
    assert (ds.PatientID, ds.AccessionNumber) == (source.patient_id, source.accession_number)
    # root and template
    assert _code(ds) == ("18748-4", "LN")
    assert ds.ContentTemplateSequence[0].TemplateIdentifier == "2000"
    sections = [(_code(i)[0], _language(i)) for i in ds.ContentSequence if i.ValueType == "CONTAINER"]
    assert sections == [("121070", "en"), ("121072", "en"), ("121070", "ar"), ("121072", "ar")]
    by = {(_code(i)[0], _language(i)): i for i in ds.ContentSequence if i.ValueType == "CONTAINER"}
    assert _texts(by[("121070", "en")], "121071") == [
        "The lungs are clear.", "No pleural effusion.", "Heart size is within normal limits."]
    assert _texts(by[("121072", "ar")], "121073") == [SECTIONS["ar"].impression]
    assert _texts(by[("121070", "ar")], "121071")[0] == "الرئتان سليمتان."
    # disclaimer in both languages as content
    comments = {_language(i): str(i.TextValue) for i in ds.ContentSequence if _code(i) == ("121106", "DCM")}
    # Arabic inside a right-to-left isolate (viewers lay text out left to right), English as is
    assert comments == {"en": DISCLAIMER["en"], "ar": "\u2067" + DISCLAIMER["ar"] + "\u2069"}
    ar_findings = [str(c.TextValue) for c in by[("121070", "ar")].ContentSequence if c.ValueType == "TEXT"]
    assert all(v.startswith("\u2067") and v.endswith("\u2069") for v in ar_findings)
    # algorithm: TID 4019 and the IHE AIR contributing equipment item
    algo = {_code(i)[0]: str(i.TextValue) for i in ds.ContentSequence if _code(i)[0] in ("111001", "111003")}
    assert algo == {"111001": draft.model.model_name, "111003": draft.model.model_revision}
    (equip,) = ds.ContributingEquipmentSequence
    purpose = equip.PurposeOfReferenceCodeSequence[0]
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning) == (
        "Newcode1", "99IHE", "Processing Algorithm")
    assert equip.DeviceUID == device_uid(draft.model)
    assert equip.ManufacturerModelName == draft.model.model_name
    assert list(equip.SoftwareVersions) == ["taqrir 0.1.0", draft.model.model_revision[:60]]
    # evidence names the key images
    refs = [(s.SeriesInstanceUID, r.ReferencedSOPInstanceUID)
            for st in ds.CurrentRequestedProcedureEvidenceSequence for s in st.ReferencedSeriesSequence
            for r in s.ReferencedSOPSequence]
    assert refs == [(k.series_instance_uid, k.sop_instance_uids[0]) for k in draft.key_images]


def test_same_draft_same_instance_and_bytes(tmp_path: Path) -> None:
    draft = sample_draft()
    source = SourceAttributes.from_study_ref(draft.study)
    a = build_draft_sr(draft, source, EQUIPMENT)
    b = build_draft_sr(draft, source, EQUIPMENT)
    a.save_as(tmp_path / "a.dcm", enforce_file_format=True)
    b.save_as(tmp_path / "b.dcm", enforce_file_format=True)
    assert (tmp_path / "a.dcm").read_bytes() == (tmp_path / "b.dcm").read_bytes()
    assert a.SOPInstanceUID == object_uids(draft, "sr").sop_instance_uid
    other = build_draft_sr(draft.model_copy(update={"draft_id": "other"}), source, EQUIPMENT)
    assert other.SOPInstanceUID != a.SOPInstanceUID and other.SeriesInstanceUID != a.SeriesInstanceUID
    assert len({object_uids(draft, k).sop_instance_uid for k in ("sr", "pdf", "kos")}) == 3


def test_device_uid_changes_with_model_revision() -> None:
    draft = sample_draft()
    newer = draft.model.model_copy(update={"model_revision": "sha256:" + "0" * 64})
    assert device_uid(newer) != device_uid(draft.model)
    assert device_uid(draft.model.model_copy()) == device_uid(draft.model)


@pytest.mark.parametrize("text", ["", "   \n\n "])
def test_empty_section_is_marked_not_invented(tmp_path: Path, text: str) -> None:
    draft = sample_draft()
    sections = {"en": Sections(findings=text, impression="Normal."), "ar": SECTIONS["ar"]}
    ds = write_and_read(build_draft_sr(draft.model_copy(update={"sections": sections}),
                                       SourceAttributes.from_study_ref(draft.study), EQUIPMENT), tmp_path / "sr.dcm")
    assert dciodvfy_errors(tmp_path / "sr.dcm") == []
    findings = next(i for i in ds.ContentSequence if _code(i)[0] == "121070")
    assert _texts(findings, "121071") == ["[no text]"]


def test_very_long_text_becomes_short_finding_lines(tmp_path: Path) -> None:
    draft = sample_draft()
    long_sentence = " ".join(["opacity"] * 3000)  # 23 999 characters, no full stop
    unbroken = "x" * 500
    sections = {"en": Sections(findings=long_sentence + ". " + unbroken, impression=long_sentence),
                "ar": Sections(findings="نص " * 5000, impression="انطباع.")}
    ds = write_and_read(build_draft_sr(draft.model_copy(update={"sections": sections}),
                                       SourceAttributes.from_study_ref(draft.study), EQUIPMENT), tmp_path / "sr.dcm")
    assert dciodvfy_errors(tmp_path / "sr.dcm") == []
    findings = next(i for i in ds.ContentSequence if _code(i)[0] == "121070")
    lines = _texts(findings, "121071")
    assert len(lines) == 2  # one item per sentence, long ones broken into short lines
    assert max(len(row) for item in lines for row in item.split("\r\n")) <= FINDING_LINE_CHARS
    assert " ".join(lines).replace("\r\n", " ").replace(" ", "") == (long_sentence + "." + unbroken).replace(" ", "")
    impression = next(i for i in ds.ContentSequence if _code(i)[0] == "121072")
    assert _texts(impression, "121073") == [long_sentence]  # impressions wrap in viewers: kept whole


def test_finding_lines_split_sentences_in_both_scripts() -> None:
    assert finding_lines("A. B?\nC") == ["A.", "B?", "C"]
    assert finding_lines("هل يوجد كسر؟ لا. العظام سليمة") == ["هل يوجد كسر؟", "لا.", "العظام سليمة"]
    assert finding_lines("  \n ") == []
    assert finding_lines("one two three four", limit=9) == ["one two\r\nthree\r\nfour"]


def test_legacy_charset_patient_name_is_reencoded_to_utf8(tmp_path: Path) -> None:
    """ISO_IR 127 (Arabic) source: the SR says ISO_IR 192 and the name reads back the same."""
    draft = draft_from_dicom([ARABIC_NAME])
    source = SourceAttributes.from_dataset(pydicom.dcmread(ARABIC_NAME, stop_before_pixels=True))
    assert source.source_character_set == ("ISO_IR 127",)
    ds = write_and_read(build_draft_sr(draft, source, EQUIPMENT), tmp_path / "sr.dcm")
    assert dciodvfy_errors(tmp_path / "sr.dcm") == []
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert str(ds.PatientName) == "قباني^لنزار"
    raw = (tmp_path / "sr.dcm").read_bytes()
    assert "قباني^لنزار".encode() in raw


def test_no_key_images_gives_an_sr_without_evidence(tmp_path: Path) -> None:
    draft = sample_draft().model_copy(update={"key_images": ()})
    ds = write_and_read(build_draft_sr(draft, SourceAttributes.from_study_ref(draft.study), EQUIPMENT),
                        tmp_path / "sr.dcm")
    assert dciodvfy_errors(tmp_path / "sr.dcm") == []
    assert "CurrentRequestedProcedureEvidenceSequence" not in ds


def test_source_of_another_study_is_refused() -> None:
    draft = sample_draft()
    other = SourceAttributes.from_study_ref(draft.study).model_copy(update={"study_instance_uid": "1.2.3"})
    with pytest.raises(ValueError, match=r"source attributes are of study 1\.2\.3"):
        build_draft_sr(draft, other, EQUIPMENT)


def test_source_values_are_validated_or_dropped() -> None:
    ds = pydicom.dcmread(ARABIC_NAME, stop_before_pixels=True)
    ds.StudyDate, ds.StudyTime, ds.PatientSex, ds.PatientBirthDate = "1994.01.30", "11:25:01", "X", "19999"
    source = SourceAttributes.from_dataset(ds)
    assert (source.study_date, source.study_time, source.patient_sex, source.patient_birth_date) == (
        "19940130", "112501", "", "")
    del ds.StudyInstanceUID
    with pytest.raises(ValueError, match="Study Instance UID"):
        SourceAttributes.from_dataset(ds)


def test_each_arabic_line_is_its_own_isolate() -> None:
    from reporting.dicom.sr import directional

    assert directional("نص\r\nآخر", "ar") == "\u2067نص\u2069\r\n\u2067آخر\u2069"
    assert directional("text", "en") == "text" and directional("", "ar") == ""
