"""Keys: which routes need one, what a wrong one gets, and the headers every answer carries."""
from __future__ import annotations

import logging

import pytest

from service.engine.deployment_secret import read_or_create
from service.keys import KeyStore

from .api_helpers import A, B, M, assert_error
from .fakes import CRASH_CODE, KEY_A, key_id


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


def test_metrics_need_a_metrics_key_and_a_metrics_key_reaches_nothing_else(client):
    assert client.simulate_get("/metrics", headers=M).status_code == 200
    for headers in (A, B):  # a tenant key must not see every tenant's activity
        assert_error(client.simulate_get("/metrics", headers=headers), 403, "forbidden")
    for method, path in [("GET", "/v1/sandboxes"), ("POST", "/v1/sandboxes"), ("GET", "/v1/sandboxes/sb-1")]:
        assert_error(client.simulate_request(method, path, headers=M), 403, "forbidden")


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_store_keys_work_at_once_and_a_revoked_key_is_refused(client, config):
    store = KeyStore(config.state_dir, read_or_create(config.secret_file))
    entry, key = store.add("carol")
    created = client.simulate_post("/v1/sandboxes", json={}, headers=_bearer(key))
    assert created.status_code == 201
    assert [s["id"] for s in client.simulate_get("/v1/sandboxes", headers=_bearer(key)).json["sandboxes"]] == [
        created.json["id"]]
    assert client.simulate_get("/v1/sandboxes", headers=A).json["sandboxes"] == []  # another key sees nothing
    store.revoke(entry["id"])
    assert_error(client.simulate_get("/v1/sandboxes", headers=_bearer(key)), 401, "unauthorized")


def test_a_rotated_key_keeps_its_sandboxes(client, config, manager):
    store = KeyStore(config.state_dir, read_or_create(config.secret_file))
    entry, old_key = store.add("dave")
    sandbox_id = client.simulate_post("/v1/sandboxes", json={}, headers=_bearer(old_key)).json["id"]
    client.simulate_post(f"/v1/sandboxes/{sandbox_id}/exec", json={"code": "x = 41"}, headers=_bearer(old_key))
    client.simulate_post(f"/v1/sandboxes/{sandbox_id}/freeze", headers=_bearer(old_key))
    _, new_key = store.rotate(entry["id"], overlap_s=0)
    assert_error(client.simulate_get(f"/v1/sandboxes/{sandbox_id}", headers=_bearer(old_key)), 401, "unauthorized")
    ran = client.simulate_post(f"/v1/sandboxes/{sandbox_id}/exec", json={"code": "x + 1"}, headers=_bearer(new_key))
    assert ran.status_code == 200 and ran.json["text"] == "42"  # the frozen sandbox, resumed for the new secret
    assert manager.registry.get(sandbox_id).owner == entry["id"]


def test_logs_never_show_a_key(client, config, caplog):
    caplog.set_level(logging.DEBUG)
    sandbox_id = client.simulate_post("/v1/sandboxes", json={}, headers=A).json["id"]
    client.simulate_post(f"/v1/sandboxes/{sandbox_id}/exec", json={"code": CRASH_CODE}, headers=A)  # a logged 500
    client.simulate_get("/v1/sandboxes", headers={"Authorization": "Bearer wrong-key-123"})
    client.simulate_get("/metrics", headers=A)
    assert key_id(config, KEY_A) in caplog.text  # the 500's log line names the key by its id
    for key in (KEY_A, "wrong-key-123"):
        assert key not in caplog.text
