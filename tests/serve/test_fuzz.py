"""Fuzz the server's OpenAPI schema with schemathesis: valid and invalid bodies for every
operation; none may get a 5xx, and the server still serves afterwards."""
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from tests.serve.server import wait_until

EXAMPLES = 25  # per operation and mode: the whole fuzz run stays around a minute on 2 CPU cores


@pytest.fixture(scope="module")
def api_schema(server):
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    return schema


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_no_server_errors(case, server):
    case.call_and_validate(base_url=server.url, checks=[not_a_server_error], timeout=60)


def test_still_serves_after_fuzzing(server):
    wait_until(lambda: server.metrics()["trtllm_num_requests_running"] == 0, 120, what="fuzz requests done")
    r = server.post("/v1/completions", json={"prompt": "still here", "max_tokens": 4}, timeout=30)
    assert r.status_code == 200
