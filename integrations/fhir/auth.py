"""Bearer tokens with SMART App Launch v2 scopes (https://hl7.org/fhir/smart-app-launch/scopes-and-launch-context.html).

A scope ``<context>/<type>.<perms>`` grants ``perms`` (letters from ``cruds``; v1 ``read`` = ``rs``,
``write`` = ``cud``, ``*`` = all) on ``type`` (or ``*``). ``user/`` and ``system/`` scopes grant
access to every resource of the type; ``patient/`` scopes only to the compartment of the token's
``patient`` claim (Patient, DiagnosticReport, ImagingStudy). Scopes with v2 query restrictions
(``?param=value``) are not honoured (they grant nothing). Reads need ``r``, searches ``s``, the
review operation ``u``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import jwt

from ground.clock import utcnow

from .config import ApiSettings
from .errors import Forbidden, Unauthorized

log = logging.getLogger(__name__)

_SCOPE = re.compile(r"^(patient|user|system)/([A-Za-z]+|\*)\.(read|write|\*|c?r?u?d?s?)$")
PATIENT_COMPARTMENT = frozenset({"Patient", "DiagnosticReport", "ImagingStudy"})


@dataclass(frozen=True)
class Grant:
    """One parsed scope."""

    context: str
    resource_type: str
    perms: frozenset[str]


@dataclass(frozen=True)
class Principal:
    """Who is calling, from a verified token."""

    subject: str
    grants: tuple[Grant, ...]
    patient: str | None = None
    name: str = ""

    def allows(self, resource_type: str, perm: str) -> bool:
        """Whether any scope grants ``perm`` on ``resource_type`` (patient scopes included)."""
        return any(self._match(g, resource_type, perm) for g in self.grants)

    def unrestricted(self, resource_type: str, perm: str) -> bool:
        """Whether a user/system scope grants ``perm`` (no patient compartment limit)."""
        return any(self._match(g, resource_type, perm) for g in self.grants if g.context != "patient")

    @staticmethod
    def _match(g: Grant, resource_type: str, perm: str) -> bool:
        if g.resource_type not in ("*", resource_type) or perm not in g.perms:
            return False
        return g.context != "patient" or resource_type in PATIENT_COMPARTMENT

    def require(self, resource_type: str, perm: str) -> None:
        """:class:`Forbidden` unless a scope grants ``perm`` on ``resource_type``."""
        if not self.allows(resource_type, perm):
            raise Forbidden(f"token scopes do not allow '{perm}' on {resource_type} "
                            f"(needs e.g. user/{resource_type}.{perm})")
        if not self.unrestricted(resource_type, perm) and not self.patient:
            raise Forbidden("patient/ scopes need a 'patient' claim in the token")


def parse_scopes(scope: str) -> tuple[Grant, ...]:
    """Grants from a space-separated scope string (unknown scopes such as openid are skipped)."""
    grants = []
    for item in scope.split():
        m = _SCOPE.match(item)
        if not m:
            continue
        ctx, rtype, perms = m.groups()
        letters = {"read": "rs", "write": "cud", "*": "cruds"}.get(perms, perms)
        if letters:
            grants.append(Grant(ctx, rtype, frozenset(letters)))
    return tuple(grants)


_V2_PERMS = re.compile(r"^c?r?u?d?s?$")
_RESOURCE_SCOPE = re.compile(r"^(patient|user|system)/([A-Za-z]+|\*)\.([^?]*)(\?.*)?$")
OTHER_SMART_SCOPES = frozenset({"openid", "fhirUser", "profile", "launch", "launch/patient", "launch/encounter",
                                "offline_access", "online_access"})
"""Non-resource scopes of SMART App Launch v2 (scopes-and-launch-context.html): identity and launch context."""


class InvalidScope(ValueError):
    """A scope that SMART App Launch v2 does not define, or one this server would grant nothing for."""


def check_scope(scope: str) -> None:
    """:class:`InvalidScope` unless ``scope`` is a valid SMART v2 scope (issue 11, item 28).

    Resource scopes are ``<patient|user|system>/<Type|*>.<perms>`` with ``perms`` one or more of
    ``cruds`` *in that order* (v2 requires the order; ``rsu`` is not a scope, ``rus`` is), or the
    v1 forms ``read``, ``write`` and ``*``, which SMART v2 servers accept as ``rs``, ``cud`` and
    ``cruds``. v2 query restrictions (``?param=value``) are refused here because this server would
    honour them by granting nothing. The identity and launch scopes (``openid``, ``fhirUser``,
    ``launch/patient``...) are accepted as they are."""
    if scope in OTHER_SMART_SCOPES:
        return
    m = _RESOURCE_SCOPE.match(scope)
    if m is None:
        raise InvalidScope(f"{scope!r} is not a SMART scope: use <patient|user|system>/<Type|*>.<cruds>, "
                           f"e.g. user/DiagnosticReport.rs (or one of {', '.join(sorted(OTHER_SMART_SCOPES))})")
    _, _, perms, query = m.groups()
    if query:
        raise InvalidScope(f"{scope!r}: SMART v2 query restrictions (?param=value) are not honoured by this server; "
                           "give the scope without them")
    if perms in ("read", "write", "*"):
        return
    if not perms or not _V2_PERMS.match(perms):
        ordered = "".join(c for c in "cruds" if c in perms)
        hint = f"; did you mean .{ordered}?" if ordered and set(perms) <= set("cruds") and len(set(perms)) == len(perms) else ""
        raise InvalidScope(f"{scope!r}: permissions must be letters of 'cruds' in that order (SMART v2){hint}")


def smart_configuration(api: ApiSettings) -> str:
    """The ``.well-known/smart-configuration`` document (SMART App Launch 2.0, conformance.html):
    public, so that clients can discover how to get a token before they hold one."""
    doc: dict[str, Any] = {
        "capabilities": ["permission-v2", "permission-v1", "permission-patient", "permission-user",
                         "client-confidential-symmetric"] + (["client-confidential-asymmetric"] if api.jwks_url or api.jwks_file else []),
        "scopes_supported": sorted(OTHER_SMART_SCOPES) + [f"{ctx}/{rt}.{p}" for ctx in ("user", "system", "patient")
                                                           for rt, p in (("*", "rs"), ("DiagnosticReport", "rs"),
                                                                         ("DiagnosticReport", "u"))],
        "response_types_supported": ["code"],
        "code_challenge_methods_supported": ["S256"],
        "grant_types_supported": ["authorization_code", "client_credentials"] if api.smart_token_endpoint else [],
        "token_endpoint_auth_methods_supported": ["private_key_jwt", "client_secret_basic"],
    }
    if api.smart_token_endpoint:
        doc["token_endpoint"] = api.smart_token_endpoint
    if api.smart_authorization_endpoint:
        doc["authorization_endpoint"] = api.smart_authorization_endpoint
    if api.jwt_issuer:
        doc["issuer"] = api.jwt_issuer
    if api.jwks_url:
        doc["jwks_uri"] = api.jwks_url
    return json.dumps(doc)


def key_path(api: ApiSettings, data_dir: Path) -> Path:
    """Where the HS256 key lives."""
    return api.jwt_key_file or (data_dir / "api-key")


def ensure_local_key(api: ApiSettings, data_dir: Path) -> bytes:
    """The HS256 key, created (256 random bits, mode 0600) when missing."""
    path = key_path(api, data_dir)
    if not path.exists():
        # Write a private temporary file, then link it into place: concurrent workers either create
        # the key or read the one that won, never a half-written file.
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        try:
            os.link(tmp, path)
            log.info("created API signing key %s", path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    key = path.read_text().strip().encode()
    if len(key) < 32:
        raise ValueError(f"API key in {path} is shorter than 32 bytes; replace it")
    return key


def issue_token(api: ApiSettings, data_dir: Path, user: str, scopes: list[str], *,
                patient: str | None = None, ttl_s: int | None = None, name: str | None = None) -> str:
    """An HS256 token for ``user`` with ``scopes`` signed with the local key (``taqrir token``)."""
    if api.jwt_algorithm != "HS256":
        raise ValueError("taqrir token issues HS256 tokens only; with RS256 your identity provider issues them")
    for scope in scopes:
        check_scope(scope)
    now = utcnow()
    claims: dict[str, Any] = {"sub": user, "scope": " ".join(scopes), "iat": now,
                              "exp": now + timedelta(seconds=ttl_s or api.token_ttl_s)}
    if api.jwt_issuer:
        claims["iss"] = api.jwt_issuer
    if api.jwt_audience:
        claims["aud"] = api.jwt_audience
    if patient:
        claims["patient"] = patient
    if name:
        claims["name"] = name
    return jwt.encode(claims, ensure_local_key(api, data_dir), algorithm="HS256")


class TokenVerifier:
    """Verifies bearer tokens against the configured key(s)."""

    def __init__(self, api: ApiSettings, data_dir: Path) -> None:
        self._api = api
        self._hs_key: bytes | None = None
        self._jwks: jwt.PyJWKClient | None = None
        self._jwks_set: jwt.PyJWKSet | None = None
        self._cache: dict[str, tuple[float, Principal]] = {}
        self._cache_size = 4096
        if api.jwt_algorithm == "HS256":
            self._hs_key = ensure_local_key(api, data_dir)
        elif api.jwks_file:
            self._jwks_set = jwt.PyJWKSet.from_dict(json.loads(api.jwks_file.read_text()))
        elif api.jwks_url:
            self._jwks = jwt.PyJWKClient(api.jwks_url, cache_keys=True)

    def _key(self, token: str) -> Any:
        if self._hs_key is not None:
            return self._hs_key
        kid = jwt.get_unverified_header(token).get("kid")
        if self._jwks_set is not None:
            keys = [k for k in self._jwks_set.keys if kid is None or k.key_id == kid]
            if not keys:
                raise Unauthorized("token key id is not in the JWKS")
            return keys[0].key
        assert self._jwks is not None
        return self._jwks.get_signing_key_from_jwt(token).key

    def verify(self, authorization: str | None) -> Principal:
        """The caller of a request with this Authorization header, or :class:`Unauthorized`.

        Verified tokens are remembered until they expire (clients send the same token with every
        request; the signature check is the costliest part of a small read)."""
        if authorization:
            hit = self._cache.get(authorization)
            if hit is not None and hit[0] > time.time():
                return hit[1]
        principal, exp = self._verify(authorization)
        if len(self._cache) >= self._cache_size:
            self._cache.clear()
        self._cache[authorization or ""] = (exp, principal)
        return principal

    def _verify(self, authorization: str | None) -> tuple[Principal, float]:
        if not authorization:
            raise Unauthorized("no Authorization header: send 'Authorization: Bearer <token>'")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("Authorization must be 'Bearer <token>'")
        api = self._api
        try:
            claims = jwt.decode(
                token.strip(), self._key(token.strip()), algorithms=[api.jwt_algorithm],
                audience=api.jwt_audience, issuer=api.jwt_issuer, leeway=api.leeway_s,
                options={"require": ["exp", "sub"], "verify_aud": api.jwt_audience is not None},
            )
        except jwt.ExpiredSignatureError as err:
            raise Unauthorized("token has expired") from err
        except (jwt.InvalidTokenError, jwt.PyJWKClientError, ValueError) as err:
            raise Unauthorized(f"token is not valid: {err}") from err
        scope = claims.get("scope")
        if scope is None and isinstance(claims.get("scp"), list):
            scope = " ".join(str(s) for s in claims["scp"])
        if not isinstance(scope, str) or not isinstance(claims.get("sub"), str):
            raise Unauthorized("token needs a string 'sub' and a 'scope' claim")
        patient = claims.get("patient")
        principal = Principal(subject=claims["sub"], grants=parse_scopes(scope),
                              patient=str(patient) if patient else None, name=str(claims.get("name") or ""))
        return principal, float(claims["exp"])
