"""Schemathesis against the live API's OpenAPI schema: no 5xx on any generated request."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings


@pytest.fixture(scope="session")
def api_schema(api_only):
    return schemathesis.openapi.from_url(api_only.url + "/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_server_errors(case, api_only):
    for key in ("key-a", None):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        response = case.call(base_url=api_only.url, headers=headers, timeout=60)
        assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:500]}"
