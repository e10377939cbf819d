"""The columns of the research export: one definition for the Parquet schema, the JSON Lines
keys and the data dictionary (``docs/research-export.md`` and ``data-dictionary.md`` beside each
export are generated from it; a test keeps the committed page equal to this)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import pyarrow as pa


@dataclass(frozen=True)
class ExportColumn:
    name: str
    type: pa.DataType
    description: str
    group: str


def _c(group: str, name: str, type_: pa.DataType, description: str) -> ExportColumn:
    return ExportColumn(name, type_, description, group)


_S, _F, _I, _B = pa.string(), pa.float64(), pa.int64(), pa.bool_()
_LS = pa.list_(pa.string())

COLUMNS: Final[tuple[ExportColumn, ...]] = (
    _c("identity", "draft_pseudonym", _S, "Keyed hash (HMAC-SHA256, research.pseudonym_key) of the draft id: one per row."),
    _c("identity", "study_pseudonym", _S, "Keyed hash of the Study Instance UID: the same for every version of a study."),
    _c("identity", "patient_pseudonym", _S, "Keyed hash of (issuer, Patient ID): the same for every study of a patient."),
    _c("identity", "study_version", _I, "Study version the draft was made from (raised when instances arrive after drafting)."),
    _c("identity", "superseded", _B, "A newer version of the study was drafted; this draft can no longer be reviewed."),
    _c("identity", "published", _B, "The draft was published as FHIR resources."),
    _c("study", "study_date", _S, "Study Date under research.dates: ISO date (full/shifted), year (year), null (none)."),
    _c("study", "drafted_at", _S, "When drafting finished, under research.dates (ISO 8601 UTC, year, or null)."),
    _c("study", "patient_sex", _S, "DICOM Patient's Sex: M, F, O or null."),
    _c("study", "patient_age_years", _I, "Patient's Age (DICOM AS) in whole years; over 89 reported as 90; null if absent."),
    _c("study", "modality", _S, "Modality of the first series the key images came from (DICOM Modality, e.g. CT, MR, CR)."),
    _c("study", "modalities", _LS, "Every modality in the study version."),
    _c("study", "body_part", _S, "Body Part Examined of that series (DICOM), or null."),
    _c("study", "series_count", _I, "Series in the study version."),
    _c("study", "instance_count", _I, "Instances in the study version."),
    _c("images", "key_image_count", _I, "Key images the model saw."),
    _c("images", "key_image_sha256", _LS, "SHA-256 of each key image's PNG bytes as given to the model, in order."),
    _c("images", "key_image_labels", _LS, "Each key image's label (series/slice/window it shows), in the same order."),
    _c("model", "prompt_template_id", _S, "Prompt template id (inference/prompt_templates)."),
    _c("model", "prompt_template_sha256", _S, "SHA-256 of the prompt template's files."),
    _c("model", "model_backend", _S, "Inference backend: sglang or transformers."),
    _c("model", "model_name", _S, "Model name as the backend reported it."),
    _c("model", "model_revision", _S, "Checkpoint content hash or server-reported revision."),
    _c("model", "sampling_json", _S, "Every sampling parameter as JSON (temperature, top_p, max_new_tokens, seed, stop...)."),
    _c("model", "temperature", _F, "Sampling temperature (null if not recorded)."),
    _c("model", "top_p", _F, "Nucleus sampling top_p (null if not recorded)."),
    _c("model", "max_new_tokens", _I, "Completion token limit per request (null if not recorded)."),
    _c("model", "seed", _I, "Sampling seed (null: unseeded)."),
    _c("model", "prompt_tokens", _I, "Prompt tokens over every model call of the draft (both languages, retries included)."),
    _c("model", "completion_tokens", _I, "Completion tokens over every model call of the draft."),
    _c("timing", "model_latency_s", _F, "Seconds spent in the model over every call."),
    _c("timing", "queue_s", _F, "Seconds from hand-off (study stable) to the start of rendering."),
    _c("timing", "render_s", _F, "Seconds rendering the key images."),
    _c("timing", "infer_s", _F, "Seconds of the inference stage (model calls, guards, retries)."),
    _c("timing", "persist_s", _F, "Seconds storing the draft."),
    _c("timing", "publish_s", _F, "Seconds publishing the FHIR resources and files (null if not published)."),
    _c("timing", "arrival_to_draft_s", _F, "Seconds from the study's first instance to the draft."),
    _c("timing", "arrival_to_review_s", _F, "Seconds from the first instance to the clinician's review as the audit trail recorded it (null if none)."),
    _c("timing", "arrival_to_signature_s", _F, "Seconds from the first instance to the signature of the signed report (null if none)."),
    _c("text", "en_findings", _S, "Draft findings, English (empty when research.include_text is false)."),
    _c("text", "en_impression", _S, "Draft impression, English."),
    _c("text", "ar_findings", _S, "Draft findings, Arabic."),
    _c("text", "ar_impression", _S, "Draft impression, Arabic."),
    _c("checks", "guard_passed", _B, "The output guard passed the stored text (sections present, lengths sane, Arabic script); always true for a stored draft, null if not recorded."),
    _c("checks", "guard_model_calls", _I, "Model calls spent (2 = both languages passed first time; more = a rejected answer was drawn again)."),
    _c("checks", "consistent", _B, "Bilingual consistency check: the English and Arabic agree on numbers/units, laterality, negation and lexicon terms."),
    _c("checks", "consistency_mismatches", _I, "Number of mismatches found."),
    _c("checks", "consistency_kinds", _LS, "Distinct mismatch kinds: number, laterality, negation, term."),
    _c("checks", "consistency_json", _S, "The full check result as JSON (checker and lexicon versions, each mismatch typed)."),
    _c("checks", "consistency_source", _S, "stored (checked when drafted) or recomputed (a draft older than the check, checked at export)."),
    _c("review", "review_outcome", _S, "The clinician's review of the draft: accepted, edited, rejected, or none."),
    _c("review", "reviewer_pseudonym", _S, "Keyed hash of the reviewer (token subject); null if not reviewed."),
    _c("review", "reviewer_role", _S, "The reviewer's role from research.reviewer_roles (default research.default_reviewer_role); null if not reviewed."),
    _c("review", "reviewed_at", _S, "When reviewed, under research.dates."),
    _c("signed", "signed_status", _S, "Status of the study's current signed report: final, amended or corrected (null: none received)."),
    _c("signed", "signed_source", _S, "Door it came in by: fhir, hl7 or dicom."),
    _c("signed", "signed_at", _S, "When signed (or received), under research.dates."),
    _c("signed", "signer_pseudonym", _S, "Keyed hash of the signer's id or name; null if not given."),
    _c("signed", "signed_en_text", _S, "The signed English text (empty when research.include_text is false or none)."),
    _c("signed", "signed_ar_text", _S, "The signed Arabic text."),
    *(
        _c("deltas", f"{lang}_{metric}", _F, f"{text} ({name}), draft versus the current signed {name} report; null without one.")
        for lang, name in (("en", "English"), ("ar", "Arabic"))
        for metric, text in (
            ("char_edit_distance", "Normalised character Levenshtein distance, 0-1"),
            ("percent_edited", "Share of words inserted, deleted or replaced, 0-100"),
            ("chrf", "sacrebleu chrF, 0-100"),
            ("bleu", "sacrebleu BLEU, 0-100"),
            ("rouge_l", "ROUGE-L F-measure (Arabic-aware tokenizer), 0-1"),
        )
    ),
)

SCHEMA: Final = pa.schema([pa.field(c.name, c.type, nullable=True) for c in COLUMNS])
NAMES: Final = tuple(c.name for c in COLUMNS)


def _type_name(t: pa.DataType) -> str:
    return {"string": "string", "double": "float64", "int64": "int64", "bool": "bool"}.get(str(t), str(t))


def dictionary_markdown() -> str:
    """The data dictionary as Markdown (committed as docs/research-export.md's column table)."""
    lines = ["| column | type | group | meaning |", "|---|---|---|---|"]
    for c in COLUMNS:
        lines.append(f"| `{c.name}` | {_type_name(c.type)} | {c.group} | {c.description} |")
    return "\n".join(lines) + "\n"
