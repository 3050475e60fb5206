"""Schemathesis against the live API: no 5xx on any request generated from its OpenAPI schema.

The schema is the app's own OpenAPI dict, built at collection (no server, no pytest internals:
``schemathesis.pytest.from_fixture`` broke with pytest 9); each case is sent over real HTTP to
the running API of the ``api_only`` fixture."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, settings

from service.app import create_app

schema = schemathesis.openapi.from_dict(create_app().openapi())


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_server_errors(case, api_only):
    for key in ("key-a", None):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        response = case.call(base_url=api_only.url, headers=headers, timeout=60)
        assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:500]}"
