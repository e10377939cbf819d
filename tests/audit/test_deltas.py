"""The delta metrics on real English and Arabic text (no database)."""

from __future__ import annotations

from rouge_score import rouge_scorer

from audit.deltas import normalise, script_language, text_delta, tokens

EN = "The lungs are clear. No pleural effusion. Heart size is within normal limits."
AR = "الرئتان سليمتان. لا يوجد انصباب جنبي. حجم القلب ضمن الحدود الطبيعية."


def test_identical_texts_are_unchanged() -> None:
    for text, lang in ((EN, "en"), (AR, "ar")):
        d = text_delta(text, text, lang)
        assert d.char_edit_distance == 0 and d.percent_edited == 0
        assert d.chrf == 100 and d.bleu == 100 and d.rouge_l == 1


def test_differences_no_reader_calls_edits_are_ignored() -> None:
    # diacritics, tatweel, alef forms, Eastern Arabic digits, spacing and case
    assert normalise("  أَحْمَد\u0640  ٣ سم ") == normalise("احمد 3 سم")
    assert text_delta(EN.upper(), EN, "en").char_edit_distance == 0


def test_an_edit_moves_every_metric_the_right_way() -> None:
    edited = EN.replace("No pleural effusion.", "Small left pleural effusion.")
    d = text_delta(EN, edited, "en")
    assert 0 < d.char_edit_distance < 0.3
    assert 0 < d.percent_edited < 30
    assert 50 < d.chrf < 100 and 0 < d.bleu < 100 and 0.5 < d.rouge_l < 1
    rewritten = text_delta(EN, "Large right pneumothorax with mediastinal shift.", "en")
    assert rewritten.percent_edited > 80 and rewritten.rouge_l < d.rouge_l and rewritten.chrf < d.chrf


def test_arabic_rouge_l_is_not_zero_as_with_the_default_tokenizer() -> None:
    edited_ar = AR.replace("لا يوجد انصباب جنبي", "يوجد انصباب جنبي أيسر صغير")
    default = rouge_scorer.RougeScorer(["rougeL"]).score(edited_ar, AR)["rougeL"].fmeasure
    assert default == 0.0  # what the issue warns about
    d = text_delta(AR, edited_ar, "ar")
    assert 0.5 < d.rouge_l < 1.0
    assert 0 < d.percent_edited < 50 and 0 < d.bleu < 100
    assert tokens("حجم القلب 12 مم")[:2] == ["حجم", "القلب"]


def test_script_language() -> None:
    assert script_language(AR) == "ar" and script_language(EN) == "en" and script_language("12, 3.") is None
