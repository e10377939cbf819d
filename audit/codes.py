"""What each kind of chain record *is*, in the vocabularies audit tools read.

One table (:data:`EVENT_CLASSES`) maps an audit action (``fhir.read``, ``instance.new``,
``study.queued`` ...) to

* its DICOM audit event (PS3.15 A.5, CID 400 "Audit Event ID": 110100 Application Activity ...
  110114 User Authentication), its event type codes (CID 401), and its EventActionCode (C R U D E);
* for RESTful interactions, the FHIR ``restful-interaction`` code that IHE Basic Audit Log Patterns
  (BALP) puts in ``AuditEvent.subtype`` (``type`` is then ``audit-event-type#rest``) and the BALP
  profile the resulting AuditEvent follows.

The FHIR AuditEvent view (:mod:`integrations.fhir.audit_event`) and the ATNA syslog message
(:mod:`audit.atna`) both read it, so the two never disagree, and the AuditEvent search turns a
``type``/``subtype`` code back into the actions it covers (:func:`actions_for_code`), which the
indexed ``audit_event.action`` column answers. A new audited action gets its row here; one that
has none is reported as DICOM 110100 Application Activity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

DCM: Final = "http://dicom.nema.org/resources/ontology/DCM"
AUDIT_EVENT_TYPE: Final = "http://terminology.hl7.org/CodeSystem/audit-event-type"
RESTFUL_INTERACTION: Final = "http://hl7.org/fhir/restful-interaction"
BALP: Final = "https://profiles.ihe.net/ITI/BALP/StructureDefinition/"


@dataclass(frozen=True, slots=True)
class Code:
    """A coding: system URI, code, display (DICOM Code Meaning)."""

    system: str
    code: str
    display: str


def dcm(code: str, display: str) -> Code:
    return Code(DCM, code, display)


# PS3.16 CID 400 Audit Event ID
APPLICATION_ACTIVITY: Final = dcm("110100", "Application Activity")
AUDIT_LOG_USED: Final = dcm("110101", "Audit Log Used")
EXPORT: Final = dcm("110106", "Export")
IMPORT: Final = dcm("110107", "Import")
PATIENT_RECORD: Final = dcm("110110", "Patient Record")
PROCEDURE_RECORD: Final = dcm("110111", "Procedure Record")
QUERY: Final = dcm("110112", "Query")
SECURITY_ALERT: Final = dcm("110113", "Security Alert")
USER_AUTHENTICATION: Final = dcm("110114", "User Authentication")

# PS3.16 CID 401 Audit Event Type Code
APPLICATION_START: Final = dcm("110120", "Application Start")
APPLICATION_STOP: Final = dcm("110121", "Application Stop")
LOGIN: Final = dcm("110122", "Login")
NODE_AUTHENTICATION: Final = dcm("110126", "Node Authentication")

# PS3.16 CID 402 Audit Active Participant Role ID
SOURCE_ROLE: Final = dcm("110153", "Source Role ID")
DESTINATION_ROLE: Final = dcm("110152", "Destination Role ID")
APPLICATION_ROLE: Final = dcm("110150", "Application")
APPLICATION_LAUNCHER_ROLE: Final = dcm("110151", "Application Launcher")

# PS3.16 CID 404 Audit Participant Object ID Type Code
STUDY_INSTANCE_UID: Final = dcm("110180", "Study Instance UID")

REST: Final = Code(AUDIT_EVENT_TYPE, "rest", "Restful Operation")


def rest(code: str) -> Code:
    return Code(RESTFUL_INTERACTION, code, code)


@dataclass(frozen=True, slots=True)
class EventClass:
    """How one family of actions is reported.

    ``pattern`` is an exact action, or a prefix when it ends with ``.`` (``study.`` covers every
    lifecycle state). ``interaction`` is set for FHIR RESTful interactions: the AuditEvent's
    ``type`` is then BALP's ``rest`` and ``subtype`` carries the interaction and the DICOM event.
    """

    pattern: str
    event_id: Code
    action: str  # PS3.15 EventActionCode / FHIR AuditEvent.action: C R U D E
    event_types: tuple[Code, ...] = ()
    interaction: str | None = None
    profile: str | None = None  # BALP profile id (https://profiles.ihe.net/ITI/BALP/StructureDefinition/<id>)

    def matches(self, action: str) -> bool:
        return action.startswith(self.pattern) if self.pattern.endswith(".") else action == self.pattern

    @property
    def fhir_type(self) -> Code:
        """AuditEvent.type: BALP's ``rest`` for RESTful interactions, else the DICOM event ID."""
        return REST if self.interaction else self.event_id

    @property
    def fhir_subtypes(self) -> tuple[Code, ...]:
        """AuditEvent.subtype: the interaction and the DICOM event ID (REST), or the DICOM event types."""
        if self.interaction:
            return (rest(self.interaction), self.event_id, *self.event_types)
        return self.event_types


EVENT_CLASSES: Final[tuple[EventClass, ...]] = (
    # Reads of the audit trail itself (this module's own view): DICOM A.5.3.2 Audit Log Used.
    EventClass("audit.read", AUDIT_LOG_USED, "R", interaction="read", profile="IHE.BasicAudit.Read"),
    EventClass("audit.search", AUDIT_LOG_USED, "E", interaction="search-type", profile="IHE.BasicAudit.Query"),
    EventClass("audit.export", EXPORT, "R"),
    EventClass("atna.", SECURITY_ALERT, "E", (NODE_AUTHENTICATION,)),
    # The FHIR API (integrations.fhir): BALP Read / Query / Create / Update.
    EventClass("fhir.read", PATIENT_RECORD, "R", interaction="read", profile="IHE.BasicAudit.Read"),
    EventClass("fhir.vread", PATIENT_RECORD, "R", interaction="vread", profile="IHE.BasicAudit.Read"),
    EventClass("fhir.history", PATIENT_RECORD, "R", interaction="history-instance", profile="IHE.BasicAudit.Read"),
    EventClass("fhir.search", QUERY, "E", interaction="search-type", profile="IHE.BasicAudit.Query"),
    EventClass("fhir.publish", PATIENT_RECORD, "C", interaction="create", profile="IHE.BasicAudit.Create"),
    EventClass("fhir.review.", PATIENT_RECORD, "U", interaction="update", profile="IHE.BasicAudit.Update"),
    # The DICOM listener: associations (A.5.3.12 User Authentication, login of a node, successful or
    # not) and instances received (A.5.3.6 Import).
    EventClass("association.", USER_AUTHENTICATION, "E", (LOGIN,)),
    EventClass("instance.", IMPORT, "C"),
    # The study lifecycle and its drafts.
    EventClass("study.", PROCEDURE_RECORD, "U"),
    EventClass("draft.", PATIENT_RECORD, "C"),
    # Research exports (research export / report) leave the system: A.5.3.5 Export.
    EventClass("research.", EXPORT, "R"),
)

DEFAULT_CLASS: Final = EventClass("", APPLICATION_ACTIVITY, "E")


def classify(action: str) -> EventClass:
    """The class of ``action`` (first match in table order; unknown actions: Application Activity)."""
    for cls in EVENT_CLASSES:
        if cls.matches(action):
            return cls
    return DEFAULT_CLASS


def _codes_of(cls: EventClass, *, subtype: bool) -> tuple[Code, ...]:
    return cls.fhir_subtypes if subtype else (cls.fhir_type,)


@dataclass(frozen=True)
class ActionFilter:
    """The actions a code covers: exact names, prefixes, and (for the default class) everything
    that no table row covers (``other``)."""

    exact: tuple[str, ...] = ()
    prefixes: tuple[str, ...] = ()
    other: bool = False
    excluded_exact: tuple[str, ...] = ()
    excluded_prefixes: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.exact or self.prefixes or self.other)


def actions_for_code(system: str | None, code: str, *, subtype: bool = False) -> ActionFilter:
    """The actions whose AuditEvent ``type`` (or one of its ``subtype``\\ s) is ``system|code``
    (``system`` None: any system). Table order decides the class of an action (as in
    :func:`classify`), so rows that fall under a matching prefix but come earlier with other codes
    are excluded."""

    def hit(cls: EventClass) -> bool:
        return any(c.code == code and (system is None or c.system == system) for c in _codes_of(cls, subtype=subtype))

    exact: list[str] = []
    prefixes: list[str] = []
    excl_exact: list[str] = []
    excl_prefixes: list[str] = []
    for i, cls in enumerate(EVENT_CLASSES):
        if not hit(cls) or any(e.matches(cls.pattern) for e in EVENT_CLASSES[:i]):
            continue  # not this code, or its actions belong to an earlier row
        if cls.pattern.endswith("."):
            prefixes.append(cls.pattern)
            for earlier in EVENT_CLASSES[:i]:
                if earlier.pattern.startswith(cls.pattern) and not hit(earlier):
                    (excl_prefixes if earlier.pattern.endswith(".") else excl_exact).append(earlier.pattern)
        else:
            exact.append(cls.pattern)
    return ActionFilter(tuple(exact), tuple(prefixes), hit(DEFAULT_CLASS), tuple(excl_exact), tuple(excl_prefixes))


def known_patterns() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(exact actions, prefixes) of every table row: what ``other`` in :class:`ActionFilter` excludes."""
    exact = tuple(c.pattern for c in EVENT_CLASSES if not c.pattern.endswith("."))
    prefixes = tuple(c.pattern for c in EVENT_CLASSES if c.pattern.endswith("."))
    return exact, prefixes


OUTCOMES: Final = {"success": "0", "failure": "4", "minor": "4", "serious": "8", "error": "8", "major": "12"}


def outcome_code(outcome: str) -> str:
    """PS3.15 EventOutcomeIndicator / FHIR AuditEvent.outcome for a chain outcome (0 success,
    4 minor failure, 8 serious failure, 12 major failure)."""
    return OUTCOMES.get(outcome, "4")
