"""Errors of the FHIR API. Each maps to one HTTP status and an OperationOutcome issue code
(R4 valueset-issue-type) in one place: :mod:`integrations.fhir.app` installs the handler."""

from __future__ import annotations

from ground.errors import TaqrirError


class FhirError(TaqrirError):
    """Root of the FHIR API's errors."""

    status_code = 500
    issue_code = "exception"


class InvalidRequest(FhirError):
    """Malformed or unsupported parameters, bodies or headers (400)."""

    status_code = 400
    issue_code = "invalid"


class NotSupported(FhirError):
    """A parameter, type or interaction this server does not support (400)."""

    status_code = 400
    issue_code = "not-supported"


class Unauthorized(FhirError):
    """No credentials, or credentials that do not verify (401)."""

    status_code = 401
    issue_code = "login"


class Forbidden(FhirError):
    """Valid credentials without the scope the interaction needs (403)."""

    status_code = 403
    issue_code = "forbidden"


class NotFound(FhirError):
    """No such resource type, id or version (404)."""

    status_code = 404
    issue_code = "not-found"


class Conflict(FhirError):
    """The interaction is not allowed in the resource's current state (409)."""

    status_code = 409
    issue_code = "conflict"


class Superseded(Conflict):
    """A review of a draft that a newer study version's draft superseded (409, business-rule).

    409 rather than 422: the request is well-formed and would be accepted for a current draft; it
    conflicts with the *state* of the target resource (RFC 9110 15.5.10; R4 http.html lists 409
    for state conflicts), and the answer names the report to review instead."""

    issue_code = "business-rule"


class NotAcceptable(FhirError):
    """The client asked for a format this server does not produce (406, R4 http.html#mime-type)."""

    status_code = 406
    issue_code = "not-supported"


class PreconditionFailed(FhirError):
    """If-Match names a version that is no longer current (412)."""

    status_code = 412
    issue_code = "conflict"


class PreconditionRequired(FhirError):
    """An update-like operation without If-Match (428, RFC 6585)."""

    status_code = 428
    issue_code = "required"


class AuditUnavailable(FhirError):
    """An access could not be recorded in the audit trail, so it is refused (503)."""

    status_code = 503
    issue_code = "transient"


class QueryTooCostly(FhirError):
    """A read that PostgreSQL's statement_timeout stopped (503, issue type too-costly)."""

    status_code = 503
    issue_code = "too-costly"


class ClientGone(FhirError):
    """The client disconnected before the answer (nginx's 499; nobody reads this response)."""

    status_code = 499
    issue_code = "incomplete"
