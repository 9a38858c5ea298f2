"""schemathesis against the served OpenAPI schema: no generated request gets a 5xx."""

from __future__ import annotations

from typing import Any

import schemathesis
from hypothesis import HealthCheck, settings

from dualwrite.server.openapi import OPENAPI
from tests.server.conftest import Api

schema = schemathesis.openapi.from_dict(OPENAPI)


@schema.parametrize()
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_no_generated_request_gets_a_server_error(case: Any, api: Api) -> None:
    response = case.call(base_url=str(api.client.base_url), headers=api.auth())
    assert response.status_code < 500, (case.method, case.path, response.text)
