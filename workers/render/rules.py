"""Series selection from editable YAML rules (built-in default: ``default_rules.yaml``).

A PACS admin edits the rules file; :func:`load_rules` validates it up front (precise
:class:`RulesError` messages naming the rule and key), and :func:`select_series` applies it to the
series of a study, recording for every series why it was chosen or skipped.
"""

from __future__ import annotations

import fnmatch
import functools
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal, cast

import yaml

from .errors import RulesError
from .model import InstanceInput, SeriesDecision

logger = logging.getLogger(__name__)

Action = Literal["skip", "fallback", "keep"]
_ACTIONS: tuple[Action, ...] = ("skip", "fallback", "keep")
_LEAF_KEYS = frozenset(
    {
        "modality",
        "body_part",
        "series_description",
        "image_type",
        "sop_class",
        "number_of_images",
        "number_of_frames",
        "is_image",
    }
)
_COMBINERS = frozenset({"all", "any", "not"})


@dataclass(frozen=True, slots=True)
class SeriesSummary:
    """What the rules see of one series (taken from its instances' index rows)."""

    series_instance_uid: str
    modality: str
    body_part: str
    series_description: str
    series_number: int | None
    image_type: tuple[str, ...]
    sop_classes: frozenset[str]
    number_of_images: int
    max_frames: int
    is_image: bool

    @property
    def original_primary(self) -> bool:
        """Image Type values 1 and 2 are ORIGINAL and PRIMARY (PS3.3 C.7.6.1.1.2)."""
        return self.image_type[:2] == ("ORIGINAL", "PRIMARY")

    @classmethod
    def of(cls, instances: Sequence[InstanceInput]) -> SeriesSummary:
        """Summarise the instances of one series (first instance by Instance Number speaks for it;
        among equal numbers, the smallest SOP Instance UID: never the order of arrival)."""
        if not instances:
            raise ValueError("a series needs at least one instance")
        first = min(instances, key=lambda i: (i.instance_number is None, i.instance_number or 0,
                                              i.sop_instance_uid))
        return cls(
            series_instance_uid=first.series_instance_uid,
            modality=first.modality,
            body_part=first.body_part,
            series_description=first.series_description,
            series_number=first.series_number,
            image_type=first.image_type,
            sop_classes=frozenset(i.sop_class_uid for i in instances),
            number_of_images=len(instances),
            max_frames=max(i.number_of_frames for i in instances),
            is_image=any(i.is_image for i in instances),
        )


def _as_list(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str | int | float) for v in value):
        return [str(v) for v in value]
    raise RulesError(f"{where}: expected a string or a list of strings, got {value!r}")


def _check_range(value: Any, where: str) -> None:
    if not isinstance(value, Mapping) or not set(value) <= {"min", "max"} or not value:
        raise RulesError(f"{where}: expected a mapping with 'min' and/or 'max', got {value!r}")
    for bound in value.values():
        if not isinstance(bound, int):
            raise RulesError(f"{where}: bounds must be integers, got {bound!r}")


def _validate_condition(cond: Any, where: str) -> None:
    if not isinstance(cond, Mapping) or not cond:
        raise RulesError(f"{where}: a condition must be a non-empty mapping, got {cond!r}")
    for key, value in cond.items():
        here = f"{where}.{key}"
        if key in ("all", "any"):
            if not isinstance(value, list) or not value:
                raise RulesError(f"{here}: expected a non-empty list of conditions")
            for n, sub in enumerate(value):
                _validate_condition(sub, f"{here}[{n}]")
        elif key == "not":
            _validate_condition(value, here)
        elif key in ("body_part", "series_description"):
            if not isinstance(value, str):
                raise RulesError(f"{here}: expected a regular expression string, got {value!r}")
            try:
                re.compile(value)
            except re.error as err:
                raise RulesError(f"{here}: invalid regular expression ({err})") from err
        elif key in ("modality", "image_type", "sop_class"):
            _as_list(value, here)
        elif key in ("number_of_images", "number_of_frames"):
            _check_range(value, here)
        elif key == "is_image":
            if not isinstance(value, bool):
                raise RulesError(f"{here}: expected true or false, got {value!r}")
        else:
            known = ", ".join(sorted(_LEAF_KEYS | _COMBINERS))
            raise RulesError(f"{here}: unknown condition key (known: {known})")


def _in_range(value: int, bounds: Mapping[str, int]) -> bool:
    return bounds.get("min", value) <= value <= bounds.get("max", value)


def matches(cond: Mapping[str, Any], series: SeriesSummary) -> bool:
    """Whether ``series`` satisfies every key of ``cond`` (a validated condition)."""
    for key, value in cond.items():
        if key == "all":
            ok = all(matches(sub, series) for sub in value)
        elif key == "any":
            ok = any(matches(sub, series) for sub in value)
        elif key == "not":
            ok = not matches(value, series)
        elif key == "modality":
            ok = series.modality.upper() in {v.upper() for v in _as_list(value, key)}
        elif key == "body_part":
            ok = re.search(value, series.body_part) is not None
        elif key == "series_description":
            ok = re.search(value, series.series_description) is not None
        elif key == "image_type":
            ok = all(v.upper() in series.image_type for v in _as_list(value, key))
        elif key == "sop_class":
            patterns = _as_list(value, key)
            ok = any(fnmatch.fnmatchcase(uid, p) for uid in series.sop_classes for p in patterns)
        elif key == "number_of_images":
            ok = _in_range(series.number_of_images, value)
        elif key == "number_of_frames":
            ok = _in_range(series.max_frames, value)
        elif key == "is_image":
            ok = series.is_image is value
        else:  # validated beforehand; kept for type completeness
            raise RulesError(f"unknown condition key {key!r}")
        if not ok:
            return False
    return True


@dataclass(frozen=True, slots=True)
class Rule:
    """One selection rule: a condition, what to do when it matches, and why."""

    name: str
    action: Action
    reason: str
    when: Mapping[str, Any]
    priority: int = 0


@dataclass(frozen=True, slots=True)
class RuleSet:
    """An ordered list of rules (first match wins)."""

    rules: tuple[Rule, ...]
    source: str

    @classmethod
    def from_mapping(cls, data: Any, source: str) -> RuleSet:
        """Validate a parsed YAML document and build the rule set."""
        if not isinstance(data, Mapping):
            raise RulesError(f"{source}: the top level must be a mapping with a 'rules' list")
        if data.get("version", 1) != 1:
            raise RulesError(
                f"{source}: unsupported rules version {data.get('version')!r} (1 known)"
            )
        raw_rules = data.get("rules")
        if not isinstance(raw_rules, list) or not raw_rules:
            raise RulesError(f"{source}: 'rules' must be a non-empty list")
        rules: list[Rule] = []
        for n, raw in enumerate(raw_rules):
            where = f"{source}: rules[{n}]"
            if not isinstance(raw, Mapping):
                raise RulesError(f"{where}: each rule must be a mapping")
            unknown = set(raw) - {"name", "action", "reason", "when", "priority"}
            if unknown:
                raise RulesError(f"{where}: unknown keys {sorted(unknown)}")
            name = raw.get("name")
            if not isinstance(name, str) or not name:
                raise RulesError(f"{where}: 'name' must be a non-empty string")
            where = f"{source}: rule {name!r}"
            action = raw.get("action")
            if action not in _ACTIONS:
                raise RulesError(
                    f"{where}: 'action' must be one of {list(_ACTIONS)}, got {action!r}"
                )
            reason = raw.get("reason", name)
            if not isinstance(reason, str):
                raise RulesError(f"{where}: 'reason' must be a string")
            priority = raw.get("priority", 0)
            if not isinstance(priority, int):
                raise RulesError(f"{where}: 'priority' must be an integer")
            when = raw.get("when")
            _validate_condition(when, f"{where}.when")
            rules.append(
                Rule(
                    name=name,
                    action=cast(Action, action),
                    reason=reason,
                    when=cast(Mapping[str, Any], when),
                    priority=priority,
                )
            )
        return cls(rules=tuple(rules), source=source)

    def first_match(self, series: SeriesSummary) -> Rule | None:
        """The first rule matching ``series``, or None."""
        for rule in self.rules:
            if matches(rule.when, series):
                return rule
        return None


def load_rules(path: Path | None) -> RuleSet:
    """Load and validate the rules file, or the built-in default when ``path`` is None.

    Parsed rule sets are cached by path, modification time and size, so an edited file is re-read.
    """
    if path is None:
        return _load_rules(None, 0, 0)
    try:
        st = path.stat()
    except OSError as err:
        raise RulesError(f"cannot read rules file {path}: {err.strerror or err}") from err
    return _load_rules(path, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=16)
def _load_rules(path: Path | None, mtime_ns: int, size: int) -> RuleSet:
    if path is None:
        text = resources.files(__package__).joinpath("default_rules.yaml").read_text("utf-8")
        source = "built-in default_rules.yaml"
    else:
        try:
            text = path.read_text("utf-8")
        except OSError as err:
            raise RulesError(f"cannot read rules file {path}: {err.strerror or err}") from err
        source = str(path)
    try:
        data = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # noqa: S506 - a safe loader (C or pure)
    except yaml.YAMLError as err:
        raise RulesError(f"{source}: invalid YAML ({err})") from err
    return RuleSet.from_mapping(data, source)


@dataclass(frozen=True, slots=True)
class Selection:
    """Ranked candidate series (best first) and one decision per series."""

    candidates: tuple[SeriesSummary, ...]
    decisions: dict[str, SeriesDecision]
    reasons: dict[str, str]


def _rank_key(rule_priority: int, s: SeriesSummary) -> tuple[int, int, int, int, str]:
    return (
        -rule_priority,
        0 if s.original_primary else 1,
        -s.number_of_images * max(s.max_frames, 1),
        s.series_number if s.series_number is not None else 1 << 30,
        s.series_instance_uid,
    )


def select_series(series: Sequence[SeriesSummary], rules: RuleSet) -> Selection:
    """Apply ``rules`` to every series; return ranked candidates and the skip decisions.

    Candidates are the ``keep`` series, or the ``fallback`` series when no series is kept. How many
    candidates are rendered is decided by the caller (``max_series``), which completes the
    decisions of the candidates.
    """
    decisions: dict[str, SeriesDecision] = {}
    reasons: dict[str, str] = {}
    kept: list[tuple[int, SeriesSummary]] = []
    fallback: list[tuple[int, SeriesSummary]] = []
    for s in series:
        rule = rules.first_match(s)
        uid = s.series_instance_uid
        if rule is None:
            decisions[uid] = SeriesDecision(uid, False, "skipped: no selection rule matched")
            continue
        why = f"rule {rule.name!r}: {rule.reason}"
        reasons[uid] = why
        if rule.action == "skip":
            decisions[uid] = SeriesDecision(uid, False, f"skipped by {why}")
        elif rule.action == "fallback":
            fallback.append((rule.priority, s))
        else:
            kept.append((rule.priority, s))
    pool = kept
    if kept:
        for _, s in fallback:
            uid = s.series_instance_uid
            decisions[uid] = SeriesDecision(
                uid, False, f"skipped by {reasons[uid]} (an original series exists)"
            )
    else:
        pool = fallback
    ranked = sorted(pool, key=lambda ps: _rank_key(ps[0], ps[1]))
    return Selection(candidates=tuple(s for _, s in ranked), decisions=decisions, reasons=reasons)
