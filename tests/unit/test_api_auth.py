"""Keys: which routes need one, what a wrong one gets, and the headers every answer carries."""
from __future__ import annotations

import pytest

from .api_helpers import assert_error
from .fakes import KEY_A


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {KEY_A}"}, {"Authorization": "Bearer "}],
)
def test_protected_routes_need_a_valid_key(client, headers):
    for method, path in [
        ("GET", "/v1/sandboxes"),
        ("POST", "/v1/sandboxes"),
        ("GET", "/metrics"),
        ("POST", "/v1/sandboxes/sb-1/exec"),
    ]:
        result = client.simulate_request(method, path, headers=headers)
        assert_error(result, 401, "unauthorized")
        assert result.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize("path", ["/v1/healthz", "/v1/openapi.json", "/v1/docs"])
def test_public_routes_need_no_key(client, path):
    assert client.simulate_get(path).status_code == 200


def test_every_response_names_its_worker_and_request(client):
    for result in (client.simulate_get("/v1/healthz"), client.simulate_get("/v1/sandboxes")):
        assert result.headers["x-appliance-worker"].isdigit()
        assert len(result.headers["x-request-id"]) == 12
