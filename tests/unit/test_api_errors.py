"""The API's error contract: every refusal is JSON with a stable code, the honest status, the field it is about."""
from __future__ import annotations

import logging

import falcon.testing
import pytest

from service.api import create_app

from .api_helpers import A, B, assert_error
from .fakes import BUSY_CODE, LOST_CODE, fake_manager, make_config


def test_malformed_json_is_400(client):
    assert_error(client.simulate_post("/v1/sandboxes", body=b"{not json", headers=A), 400, "bad_request")
    assert_error(client.simulate_post("/v1/sandboxes", json=[1, 2], headers=A), 400, "bad_request")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"vcpus": 0}, "vcpus"),
        ({"memory_mib": "lots"}, "memory_mib"),
        ({"timeout_s": -1}, "timeout_s"),
        ({"metadata": "not an object"}, "metadata"),
        ({"template": "gpu/xl"}, "template"),
        ({"colour": "blue"}, "colour"),
    ],
)
def test_invalid_create_field_is_422_naming_it(client, body, field):
    error = assert_error(client.simulate_post("/v1/sandboxes", json=body, headers=A), 422, "invalid")
    assert error["field"] == field and field in error["message"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "code"),
        ({"code": 5}, "code"),
        ({"code": "1", "language": "ruby"}, "language"),
        ({"code": "1", "timeout_s": 0}, "timeout_s"),
    ],
)
def test_invalid_exec_field_is_422_naming_it(client, sandbox_id, body, field):
    result = client.simulate_post(f"/v1/sandboxes/{sandbox_id}/exec", json=body, headers=A)
    assert assert_error(result, 422, "invalid")["field"] == field


def test_body_over_the_limit_is_413(client, sandbox_id):
    big = {"code": "x = 1  # " + "y" * 5000}
    assert_error(client.simulate_post(f"/v1/sandboxes/{sandbox_id}/exec", json=big, headers=A), 413, "too_large")
    assert_error(client.simulate_post("/v1/sandboxes", body=b" " * 5000, headers=A), 413, "too_large")


def test_code_over_the_limit_is_413(client, sandbox_id):
    code = "#" * 2000  # under the 4 KiB body limit, over the 1 KiB code limit
    error = assert_error(
        client.simulate_post(f"/v1/sandboxes/{sandbox_id}/exec", json={"code": code}, headers=A), 413, "too_large"
    )
    assert "max_code_bytes" in error["message"]


def test_upload_over_the_file_limit_is_413(client, sandbox_id):
    result = client.simulate_put(
        f"/v1/sandboxes/{sandbox_id}/files", params={"path": "/big"}, body=b"x" * (65 << 10), headers=A
    )
    assert_error(result, 413, "too_large")


def test_busy_sandbox_is_409(client, sandbox_id):
    result = client.simulate_post(f"/v1/sandboxes/{sandbox_id}/exec", json={"code": BUSY_CODE}, headers=A)
    assert "already running" in assert_error(result, 409, "sandbox_busy")["message"]


def test_lost_sandbox_is_410(client, sandbox_id):
    result = client.simulate_post(f"/v1/sandboxes/{sandbox_id}/exec", json={"code": LOST_CODE}, headers=A)
    assert_error(result, 410, "sandbox_lost")
    again = client.simulate_post(f"/v1/sandboxes/{sandbox_id}/exec", json={"code": "1"}, headers=A)
    assert_error(again, 410, "sandbox_lost")


def test_limit_reached_is_429_with_retry_after(client):
    for _ in range(3):
        assert client.simulate_post("/v1/sandboxes", headers=A).status_code == 201
    result = client.simulate_post("/v1/sandboxes", headers=A)
    assert_error(result, 429, "limit_reached")
    assert int(result.headers["retry-after"]) > 0
    assert client.simulate_post("/v1/sandboxes", headers=B).status_code == 201  # the limit is per key


def test_not_ready_is_503_with_retry_after(client, manager, engine):
    engine.unpublish_template(manager.templates)  # the pool keeper has not warmed its template yet
    for result in (client.simulate_get("/v1/readyz"), client.simulate_post("/v1/sandboxes", headers=A)):
        assert "warm" in assert_error(result, 503, "not_ready")["message"]
        assert int(result.headers["retry-after"]) > 0
    engine.publish_template(manager.templates)
    assert client.simulate_get("/v1/readyz").json == {"status": "ready"}


def test_unknown_route_and_wrong_method(client, sandbox_id):
    assert_error(client.simulate_get("/v1/nothing-here", headers=A), 404, "not_found")
    result = client.simulate_put(f"/v1/sandboxes/{sandbox_id}", headers=A)
    assert_error(result, 405, "method_not_allowed")
    assert "GET" in result.headers["allow"]


def test_unexpected_exception_is_500_without_traceback_but_logged(client, manager, sandbox_id, caplog):
    def explode(*args, **kwargs):
        raise KeyError("secret internal detail")

    manager.list = explode
    with caplog.at_level(logging.ERROR, logger="appliance.api"):
        result = client.simulate_get("/v1/sandboxes", headers=A)
    error = assert_error(result, 500, "internal")
    assert "secret internal detail" not in result.text
    assert result.headers["x-request-id"] in error["message"]
    assert "secret internal detail" in caplog.text and "Traceback" in caplog.text


@pytest.fixture
def roomy(tmp_path) -> falcon.testing.TestClient:
    """An API whose body limit lets a hostile body through to the parser."""
    manager, _ = fake_manager(make_config(tmp_path / "roomy", max_body_bytes=1 << 20))
    yield falcon.testing.TestClient(create_app(manager.config, manager))
    manager.close()


def nested(depth: int) -> dict:
    """A body {"metadata": {"a": {"a": ...}}} whose objects nest `depth` levels, the body itself counted."""
    body: dict = {}
    inner = body
    for key in ["metadata"] + ["a"] * (depth - 2):
        inner[key] = {}
        inner = inner[key]
    return body


@pytest.mark.parametrize("depth", [33, 200_000])
def test_a_body_nested_too_deeply_is_400(roomy, depth):
    sandbox_id = roomy.simulate_post("/v1/sandboxes", headers=A).json["id"]
    body = b"[" * depth + b"]" * depth
    for path in ("/v1/sandboxes", f"/v1/sandboxes/{sandbox_id}/exec", f"/v1/sandboxes/{sandbox_id}/fork"):
        result = roomy.simulate_post(path, body=body, headers={**A, "Content-Type": "application/json"})
        assert "nested more than 32 levels" in assert_error(result, 400, "bad_request")["message"]
    assert_error(roomy.simulate_post("/v1/sandboxes", json=nested(33), headers=A), 400, "bad_request")
    assert roomy.simulate_post("/v1/sandboxes", json=nested(32), headers=A).status_code == 201


def test_metadata_is_bounded_and_named_when_too_large(roomy):
    big = {"blob": "x" * (16 << 10)}
    error = assert_error(roomy.simulate_post("/v1/sandboxes", json={"metadata": big}, headers=A), 422, "invalid")
    assert error["field"] == "metadata" and "16384 bytes" in error["message"]
    assert roomy.simulate_get("/v1/sandboxes", headers=A).json == {"sandboxes": []}
    fits = {"blob": "x" * ((16 << 10) - 20)}
    assert roomy.simulate_post("/v1/sandboxes", json={"metadata": fits}, headers=A).status_code == 201


def test_a_registry_locked_by_another_process_is_503_node_unavailable(client, manager, monkeypatch):
    """SQLite gives up on a lock held longer than it waits (an operator's sqlite3 shell in a transaction): a documented
    503 with Retry-After, not a 500 (tests/reliability/test_faults.py holds a real lock against a live service)."""
    import sqlite3

    def locked(*args, **kwargs):
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(manager.registry, "reserve", locked)
    result = client.simulate_post("/v1/sandboxes", headers=A)
    assert "locked" in assert_error(result, 503, "node_unavailable")["message"]
    assert int(result.headers["retry-after"]) > 0
    monkeypatch.setattr(manager.registry, "reserve", lambda *args, **kwargs: (_ for _ in ()).throw(
        sqlite3.OperationalError("no such table: sandboxes")))  # a real fault stays a 500
    assert_error(client.simulate_post("/v1/sandboxes", headers=A), 500, "internal")
