"""No anonymous access: bad, expired, foreign-signed and under-scoped tokens are refused."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from ground.clock import utcnow
from integrations.fhir.auth import Principal, TokenVerifier, parse_scopes
from integrations.fhir.config import ApiSettings
from reporting.fhir.ids import patient_id
from tests.integrations.fhir.conftest import Server


def _oo(r: httpx.Response, status: int) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.json()["resourceType"] == "OperationOutcome"


def test_refusals(fhir_server: Server) -> None:
    url = f"{fhir_server.base}/DiagnosticReport/{fhir_server.report_ids[0]}"
    _oo(httpx.get(url), 401)
    assert httpx.get(url).headers["WWW-Authenticate"].startswith("Bearer")
    _oo(httpx.get(url, headers={"Authorization": "Basic abc"}), 401)
    _oo(httpx.get(url, headers={"Authorization": "Bearer not.a.jwt"}), 401)
    forged = jwt.encode({"sub": "mallory", "scope": "user/*.rs", "exp": utcnow() + timedelta(hours=1)},
                        "x" * 64, algorithm="HS256")
    _oo(httpx.get(url, headers={"Authorization": f"Bearer {forged}"}), 401)
    expired = fhir_server.headers(ttl_s=-3600)
    r = httpx.get(url, headers=expired)
    _oo(r, 401)
    assert "expired" in r.json()["issue"][0]["diagnostics"]
    none_alg = jwt.encode({"sub": "mallory", "scope": "user/*.rs", "exp": utcnow() + timedelta(hours=1)}, None, algorithm="none")
    _oo(httpx.get(url, headers={"Authorization": f"Bearer {none_alg}"}), 401)
    # valid token, wrong scopes
    _oo(httpx.get(url, headers=fhir_server.headers(["user/Patient.rs"])), 403)
    _oo(httpx.get(url, headers=fhir_server.headers(["user/DiagnosticReport.s"])), 403)
    _oo(httpx.get(f"{fhir_server.base}/DiagnosticReport", headers=fhir_server.headers(["user/DiagnosticReport.r"])), 403)
    review = httpx.post(f"{url}/$review", json={"resourceType": "Parameters", "parameter": [{"name": "action", "valueCode": "accept"}]},
                        headers={**fhir_server.headers(["user/*.rs"]), "If-Match": 'W/"1"'})
    _oo(review, 403)
    # enough scope
    assert httpx.get(url, headers=fhir_server.headers(["system/DiagnosticReport.r"])).status_code == 200
    assert httpx.get(url, headers=fhir_server.headers(["user/DiagnosticReport.read"])).status_code == 200
    # metadata is public (SMART App Launch: discovery without a token)
    assert httpx.get(f"{fhir_server.base}/metadata").status_code == 200


def test_patient_scopes_stay_in_the_compartment(fhir_server: Server) -> None:
    d0 = fhir_server.drafts[0]
    mine = patient_id(d0.study.patient)
    h = fhir_server.headers(["patient/DiagnosticReport.rs", "patient/Patient.r"], patient=mine)
    base = fhir_server.base
    assert httpx.get(f"{base}/DiagnosticReport/{fhir_server.report_ids[0]}", headers=h).status_code == 200
    # another patient's report: the same 404 as an unknown id (issue 11, item 22)
    _oo(httpx.get(f"{base}/DiagnosticReport/{fhir_server.report_ids[1]}", headers=h), 404)
    r = httpx.get(f"{base}/DiagnosticReport", headers=h)
    assert r.json()["total"] == 1
    _oo(httpx.get(f"{base}/Provenance", headers=h), 403)
    _oo(httpx.get(f"{base}/DiagnosticReport", headers=fhir_server.headers(["patient/DiagnosticReport.rs"])), 403)


def test_rs256_with_a_jwks_file(tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    jwk["kid"] = "k1"
    import json

    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    api = ApiSettings(jwt_algorithm="RS256", jwks_file=tmp_path / "jwks.json", jwt_issuer="https://idp.example",
                      jwt_audience="taqrir")
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    claims = {"sub": "dr.rs", "scope": "openid user/DiagnosticReport.rs", "iss": "https://idp.example", "aud": "taqrir",
              "exp": utcnow() + timedelta(minutes=5)}
    token = jwt.encode(claims, pem, algorithm="RS256", headers={"kid": "k1"})
    verifier = TokenVerifier(api, tmp_path)
    p = verifier.verify(f"Bearer {token}")
    assert isinstance(p, Principal) and p.subject == "dr.rs" and p.allows("DiagnosticReport", "s")
    assert not p.allows("DiagnosticReport", "u")
    wrong_aud = jwt.encode({**claims, "aud": "other"}, pem, algorithm="RS256", headers={"kid": "k1"})
    for bad in (wrong_aud, jwt.encode(claims, "k" * 64, algorithm="HS256")):
        try:
            verifier.verify(f"Bearer {bad}")
        except Exception as err:
            assert type(err).__name__ == "Unauthorized"
        else:
            raise AssertionError("token accepted")


def test_scope_grammar() -> None:
    grants = parse_scopes("openid fhirUser user/*.rs patient/Patient.read system/DiagnosticReport.cruds user/Foo.rs?x=1 bogus")
    assert [(g.context, g.resource_type, "".join(sorted(g.perms))) for g in grants] == [
        ("user", "*", "rs"), ("patient", "Patient", "rs"), ("system", "DiagnosticReport", "cdrsu")]
