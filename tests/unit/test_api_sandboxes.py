"""/v1/sandboxes: create, show, list, delete, and who may see what."""
from __future__ import annotations

import pytest

from .api_helpers import A, B, assert_error
from .fakes import states


def test_create_show_list_delete(client, manager):
    created = client.simulate_post(
        "/v1/sandboxes", json={"timeout_s": 60, "metadata": {"user": "u1"}, "template": "default"}, headers=A
    )
    assert created.status_code == 201
    sandbox = created.json
    assert sandbox["id"].startswith("sb-") and sandbox["state"] == "running"
    assert sandbox["metadata"] == {"user": "u1"} and sandbox["timeout_s"] == 60
    assert created.headers["location"] == f"/v1/sandboxes/{sandbox['id']}"
    assert client.simulate_get(f"/v1/sandboxes/{sandbox['id']}", headers=A).json == sandbox
    assert [s["id"] for s in client.simulate_get("/v1/sandboxes", headers=A).json["sandboxes"]] == [sandbox["id"]]
    assert client.simulate_delete(f"/v1/sandboxes/{sandbox['id']}", headers=A).status_code == 204
    assert_error(client.simulate_get(f"/v1/sandboxes/{sandbox['id']}", headers=A), 404, "not_found")


def test_create_with_empty_body_uses_defaults(client, config, engine):
    created = client.simulate_post("/v1/sandboxes", headers=A)
    assert created.status_code == 201
    sandbox = created.json
    assert sandbox["template_id"] and sandbox["memory_mib"] == engine.config.memory_mib  # a clone of the template
    assert sandbox["timeout_s"] == config.sandbox_timeout_s and sandbox["persistent"] is False
    assert sandbox["network"] is None and sandbox["metadata"] == {}


def test_create_passes_size(client):
    sandbox = client.simulate_post("/v1/sandboxes", json={"vcpus": 2, "memory_mib": 2048}, headers=A).json
    assert sandbox["vcpus"] == 2 and sandbox["memory_mib"] == 2048
    assert sandbox["template_id"] is None  # another size than the template's: a boot of its own


def test_other_keys_sandbox_is_not_found_everywhere(client, sandbox_id):
    path = f"/v1/sandboxes/{sandbox_id}"
    assert client.simulate_get("/v1/sandboxes", headers=B).json == {"sandboxes": []}
    for result in (
        client.simulate_get(path, headers=B),
        client.simulate_delete(path, headers=B),
        client.simulate_post(f"{path}/exec", json={"code": "1"}, headers=B),
        client.simulate_post(f"{path}/interrupt", headers=B),
        client.simulate_put(f"{path}/files", params={"path": "/x"}, body=b"x", headers=B),
        client.simulate_get(f"{path}/files", params={"path": "/x"}, headers=B),
        client.simulate_get(f"{path}/files/list", params={"path": "/"}, headers=B),
    ):
        assert_error(result, 404, "not_found")
    assert client.simulate_get(path, headers=A).status_code == 200


def test_list_filters_by_state(client, manager):
    ids = [client.simulate_post("/v1/sandboxes", headers=A).json["id"] for _ in range(3)]
    client.simulate_post(f"/v1/sandboxes/{ids[1]}/freeze", headers=A)

    def listed(state):
        result = client.simulate_get("/v1/sandboxes", params={"state": state}, headers=A)
        assert result.status_code == 200
        return [s["id"] for s in result.json["sandboxes"]]

    assert listed("frozen") == [ids[1]]
    assert listed("running") == [ids[0], ids[2]]
    assert listed("lost") == []
    assert client.simulate_get("/v1/sandboxes", params={"state": "frozen"}, headers=B).json == {"sandboxes": []}


@pytest.mark.parametrize("state", ["pooled", "FROZEN", "asleep"])
def test_list_with_an_unknown_state_is_422(client, state):
    result = client.simulate_get("/v1/sandboxes", params={"state": state}, headers=A)
    error = assert_error(result, 422, "invalid")
    assert error["field"] == "state" and "running, frozen, lost" in error["message"]


def test_create_persistent(client, manager):
    created = client.simulate_post("/v1/sandboxes", json={"persistent": True, "timeout_s": 300}, headers=A)
    assert created.status_code == 201 and created.json["persistent"] is True and created.json["timeout_s"] == 300
    assert manager.registry.get(created.json["id"]).persistent is True
    plain = client.simulate_post("/v1/sandboxes", json={}, headers=A)
    assert plain.json["persistent"] is False


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_create_persistent_must_be_a_boolean(client, value):
    error = assert_error(client.simulate_post("/v1/sandboxes", json={"persistent": value}, headers=A), 422, "invalid")
    assert error["field"] == "persistent"


def test_create_with_a_network_policy_shows_it_with_the_identity(client, manager):
    policy = {"egress": {"allow": ["192.88.99.0/24", "db.internal:5432"]}}
    created = client.simulate_post("/v1/sandboxes", json={"network": policy}, headers=A)
    assert created.status_code == 201 and manager.registry.get(created.json["id"]).network["egress"] == policy["egress"]
    assert created.json["network"]["egress"] == policy["egress"] and created.json["network"]["mac"]
    assert client.simulate_post("/v1/sandboxes", json={}, headers=A).json["network"] is None


@pytest.mark.parametrize(("network", "words"), [
    ({"egress": "everything"}, "must be"),
    ({"egress": {"allow": ["10.0.0.0/8:70000"]}}, "port"),
    ("all", "dictionary"),
])
def test_a_malformed_network_policy_is_refused_naming_the_field(client, manager, network, words):
    error = assert_error(client.simulate_post("/v1/sandboxes", json={"network": network}, headers=A), 422, "invalid")
    assert error["field"] == "network" and words in error["message"]
    assert states(manager) == {}  # nothing was created


def test_a_policy_naming_what_is_not_public_is_refused_naming_the_operators_setting(client, manager):
    policy = {"egress": {"allow": ["169.254.169.254:80"]}}  # cloud metadata; this config opts nothing in
    error = assert_error(client.simulate_post("/v1/sandboxes", json={"network": policy}, headers=A), 422, "invalid")
    assert "not on the public internet" in error["message"] and "service.egress_private_allow" in error["message"]
    assert states(manager) == {}


def test_other_keys_cannot_fork_freeze_or_resume(client, manager, sandbox_id):
    for action in ("fork", "freeze", "resume"):
        assert_error(client.simulate_post(f"/v1/sandboxes/{sandbox_id}/{action}", headers=B), 404, "not_found")
    assert states(manager) == {sandbox_id: "running"}
