"""Schemathesis over the OpenAPI schema against a real server: no 5xx, every error an
OperationOutcome. Bounded (few examples per operation) to stay within a minute or two."""

from __future__ import annotations

from typing import Any

import hypothesis
import pytest
import schemathesis

from tests.integrations.fhir.conftest import REVIEWER_SCOPES, Server


def _check_outcome(response: Any) -> None:
    assert response.status_code < 500, response.text
    body = response.json()
    if response.status_code >= 400:
        assert body["resourceType"] == "OperationOutcome", body
    else:  # a FHIR resource, or the SMART configuration (not a FHIR resource: SMART App Launch 2.0)
        assert "resourceType" in body or "capabilities" in body


@pytest.mark.filterwarnings("ignore")
def test_openapi_no_server_errors(fhir_server: Server, request: pytest.FixtureRequest) -> None:
    if request.node.callspec.params.get("db_url") == "postgres":
        pytest.skip("fuzzing once (SQLite) is enough; the store is exercised on PostgreSQL elsewhere")
    schema = schemathesis.openapi.from_url(fhir_server.base.removesuffix("/fhir") + "/openapi.json")
    headers = fhir_server.headers(REVIEWER_SCOPES, user="fuzzer")
    failures: list[str] = []
    calls = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        strategy = operation.as_strategy()

        @hypothesis.settings(max_examples=60, deadline=None, database=None,
                             suppress_health_check=list(hypothesis.HealthCheck), phases=[hypothesis.Phase.generate])
        @hypothesis.given(case=strategy)
        def run(case: Any) -> None:
            nonlocal calls
            calls += 1
            case.headers = {**(case.headers or {}), **headers}
            response = case.call()
            try:
                _check_outcome(response)
            except (AssertionError, ValueError) as err:
                failures.append(f"{case.method} {case.formatted_path} {case.query}: {response.status_code} {err}")

        run()
    assert calls > 50
    assert not failures, "\n".join(failures[:10])
