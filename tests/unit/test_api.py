"""The execution API through falcon.testing against a fake manager: routes, validation, errors, auth, streaming."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import falcon
import falcon.inspect
import falcon.testing
import openapi_spec_validator
import pytest

from service.api import create_app
from service.api.openapi import openapi_document
from service.config import ServiceConfig, hash_key
from service.engine import EngineConfig

from .fakes import BUSY_CODE, CHUNKS_CODE, CRASH_CODE, LOST_CODE, FakeManager

KEY_A, KEY_B = "key-a", "key-b"
A = {"Authorization": f"Bearer {KEY_A}"}
B = {"Authorization": f"Bearer {KEY_B}"}


def make_config(tmp: Path, **overrides) -> ServiceConfig:
    values = dict(
        engine=EngineConfig(image_dir=tmp / "image", run_dir=tmp / "run"),
        state_dir=tmp / "state",
        key_hashes=frozenset({hash_key(KEY_A), hash_key(KEY_B)}),
        max_body_bytes=4096,
        max_code_bytes=1024,
        max_file_bytes=64 << 10,
    )
    return ServiceConfig(**(values | overrides))


@pytest.fixture
def manager() -> FakeManager:
    return FakeManager(max_per_key=3)


@pytest.fixture
def app(tmp_path, manager) -> falcon.App:
    return create_app(make_config(tmp_path), manager)


@pytest.fixture
def client(app) -> falcon.testing.TestClient:
    return falcon.testing.TestClient(app)


@pytest.fixture
def sandbox_id(client) -> str:
    return client.simulate_post("/v1/sandboxes", json={}, headers=A).json["id"]


def assert_error(result, status: int, code: str) -> dict:
    assert result.status_code == status, result.text
    assert result.headers["content-type"].startswith("application/json")
    body = result.json
    assert set(body) == {"error"} and body["error"]["code"] == code and body["error"]["message"]
    assert "Traceback" not in result.text
    return body["error"]


# ---- sandboxes ------------------------------------------------------------------------------------------------


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


def test_create_with_empty_body_uses_defaults(client, manager):
    assert client.simulate_post("/v1/sandboxes", headers=A).status_code == 201
    assert manager.create_calls == [
        {"vcpus": None, "memory_mib": None, "timeout_s": None, "persistent": False, "network": None}]


def test_create_passes_size(client, manager):
    client.simulate_post("/v1/sandboxes", json={"vcpus": 2, "memory_mib": 2048}, headers=A)
    assert manager.create_calls[-1] == {
        "vcpus": 2, "memory_mib": 2048, "timeout_s": None, "persistent": False, "network": None}


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


# ---- auth -----------------------------------------------------------------------------------------------------


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


# ---- validation and error codes -------------------------------------------------------------------------------


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
        ({"template": "gpu-xl"}, "template"),
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


def test_limit_reached_is_429_with_retry_after(client):
    for _ in range(3):
        assert client.simulate_post("/v1/sandboxes", headers=A).status_code == 201
    result = client.simulate_post("/v1/sandboxes", headers=A)
    assert_error(result, 429, "limit_reached")
    assert int(result.headers["retry-after"]) > 0
    assert client.simulate_post("/v1/sandboxes", headers=B).status_code == 201  # the limit is per key


def test_not_ready_is_503_with_retry_after(client, manager):
    manager.not_ready = "no warm template yet"
    for result in (client.simulate_get("/v1/readyz"), client.simulate_post("/v1/sandboxes", headers=A)):
        assert "warm template" in assert_error(result, 503, "not_ready")["message"]
        assert int(result.headers["retry-after"]) > 0
    manager.not_ready = None
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


# ---- exec ------------------------------------------------------------------------------------------------------


def test_exec_keeps_state_and_returns_the_value(client, sandbox_id):
    path = f"/v1/sandboxes/{sandbox_id}/exec"
    first = client.simulate_post(path, json={"code": "x = 41\nprint('hi')"}, headers=A).json
    assert first["stdout"] == "hi\n" and first["text"] is None and first["results"] == []
    second = client.simulate_post(path, json={"code": "x + 1"}, headers=A).json
    assert second["text"] == "42" and second["results"] == [{"text/plain": "42"}] and second["error"] is None
    assert set(second) == {
        "stdout",
        "stderr",
        "results",
        "text",
        "error",
        "exit_code",
        "truncated_bytes",
        "worker_restarted",
        "worker_exit",
        "duration_s",
    }


def test_exec_error_is_a_result_not_an_http_error(client, sandbox_id):
    result = client.simulate_post(f"/v1/sandboxes/{sandbox_id}/exec", json={"code": "1/0"}, headers=A)
    assert result.status_code == 200
    assert result.json["error"]["name"] == "ZeroDivisionError"


def test_exec_results_are_displays_then_value(client, sandbox_id):
    body = client.simulate_post(f"/v1/sandboxes/{sandbox_id}/exec", json={"code": CHUNKS_CODE}, headers=A).json
    assert body["stdout"] == "chunk 0\nchunk 1\nchunk 2\n"
    assert [sorted(r) for r in body["results"]] == [["image/png", "text/plain"], ["text/plain"]]
    assert body["text"] == "42"


def test_bash_exec(client, sandbox_id):
    body = client.simulate_post(
        f"/v1/sandboxes/{sandbox_id}/exec", json={"code": "ls", "language": "bash"}, headers=A
    ).json
    assert body["stdout"] == "bash: ls\n" and body["exit_code"] == 0


def stream(client, sandbox_id: str, code: str) -> tuple[object, list[dict]]:
    result = client.simulate_post(
        f"/v1/sandboxes/{sandbox_id}/exec",
        json={"code": code},
        headers={**A, "Accept": "application/x-ndjson"},
    )
    assert result.status_code == 200
    assert result.headers["content-type"] == "application/x-ndjson"
    assert result.text.endswith("\n")
    return result, [json.loads(line) for line in result.text.splitlines()]


def test_streaming_framing(client, sandbox_id):
    _, events = stream(client, sandbox_id, CHUNKS_CODE)
    assert [e["type"] for e in events] == ["stdout", "stdout", "stdout", "result", "result", "done"]
    assert [e["data"] for e in events[:3]] == ["chunk 0\n", "chunk 1\n", "chunk 2\n"]
    assert events[3]["is_main_result"] is False and events[4] == {
        "type": "result",
        "data": {"text/plain": "42"},
        "is_main_result": True,
    }
    done = events[-1]
    assert done["stdout"] == "chunk 0\nchunk 1\nchunk 2\n" and done["text"] == "42" and done["sandbox_lost"] is False
    assert len(done["results"]) == 2


def test_streaming_reports_a_lost_vm_in_the_final_event(client, sandbox_id):
    _, events = stream(client, sandbox_id, LOST_CODE)
    assert events[0] == {"type": "stdout", "data": "about to die\n"}
    assert events[-1]["type"] == "done" and events[-1]["sandbox_lost"] is True
    assert events[-1]["error"]["name"] == "SandboxLost"


def test_streaming_failure_after_headers_ends_with_a_done_error_not_a_traceback(client, sandbox_id, caplog):
    with caplog.at_level(logging.ERROR, logger="appliance.api"):
        result, events = stream(client, sandbox_id, CRASH_CODE)
    assert events[0]["data"] == "partial\n"
    assert events[-1]["type"] == "done" and events[-1]["error"]["name"] == "InternalError"
    assert "Traceback" not in result.text and "Traceback" in caplog.text


def test_streaming_errors_before_the_first_event_are_plain_errors(client, sandbox_id):
    result = client.simulate_post(
        f"/v1/sandboxes/{sandbox_id}/exec", json={"code": BUSY_CODE}, headers={**A, "Accept": "application/x-ndjson"}
    )
    assert_error(result, 409, "sandbox_busy")


def test_client_leaving_a_stream_interrupts_the_code(app, manager, sandbox_id):
    env = falcon.testing.create_environ(
        method="POST",
        path=f"/v1/sandboxes/{sandbox_id}/exec",
        body=json.dumps({"code": CHUNKS_CODE}),
        headers={**A, "Accept": "application/x-ndjson", "Content-Type": "application/json"},
    )
    body = app(env, lambda status, headers: None)
    assert json.loads(next(iter(body)))["type"] == "stdout"
    body.close()  # what the server does when the client disconnects
    assert manager.interrupts == [sandbox_id]


# ---- fork, freeze, resume -----------------------------------------------------------------------------------------


def fork(client, sandbox_id: str, body=None, headers=A):
    return client.simulate_post(f"/v1/sandboxes/{sandbox_id}/fork", json=body, headers=headers)


def test_fork_returns_the_new_sandboxes_with_the_sources_state(client, manager, sandbox_id):
    client.simulate_post(f"/v1/sandboxes/{sandbox_id}/exec", json={"code": "x = [41]"}, headers=A)
    result = fork(client, sandbox_id, {"n": 2})
    assert result.status_code == 201
    kids = result.json["sandboxes"]
    assert len(kids) == 2 and len({k["id"] for k in kids} | {sandbox_id}) == 3
    assert all(k["state"] == "running" and k["metadata"] == {"forked_from": sandbox_id} for k in kids)
    for i, kid in enumerate(kids):
        client.simulate_post(f"/v1/sandboxes/{kid['id']}/exec", json={"code": f"x.append({i})"}, headers=A)
    texts = [client.simulate_post(f"/v1/sandboxes/{sid}/exec", json={"code": "x"}, headers=A).json["text"]
             for sid in (sandbox_id, kids[0]["id"], kids[1]["id"])]
    assert texts == ["[41]", "[41, 0]", "[41, 1]"]
    listed = {s["id"] for s in client.simulate_get("/v1/sandboxes", headers=A).json["sandboxes"]}
    assert listed == {sandbox_id, *(k["id"] for k in kids)}


def test_fork_body_may_be_empty_for_one_copy(client, sandbox_id):
    result = client.simulate_post(f"/v1/sandboxes/{sandbox_id}/fork", headers=A)
    assert result.status_code == 201 and len(result.json["sandboxes"]) == 1


@pytest.mark.parametrize("n", [0, -1, "2", 2.5, True, None])
def test_fork_n_must_be_a_positive_integer(client, sandbox_id, n):
    error = assert_error(fork(client, sandbox_id, {"n": n}), 422, "invalid")
    assert error["field"] == "n"


def test_fork_n_over_max_fork_is_422_naming_the_setting(tmp_path, manager):
    client = falcon.testing.TestClient(create_app(make_config(tmp_path, max_fork=4), manager))
    sandbox_id = client.simulate_post("/v1/sandboxes", headers=A).json["id"]
    error = assert_error(fork(client, sandbox_id, {"n": 5}), 422, "invalid")
    assert error["field"] == "n" and "max_fork" in error["message"]
    assert len(manager.records) == 1


def test_fork_unknown_field_is_422(client, sandbox_id):
    assert assert_error(fork(client, sandbox_id, {"count": 2}), 422, "invalid")["field"] == "count"


def test_fork_over_the_sandbox_limit_is_429_with_retry_after(client, manager, sandbox_id):
    result = fork(client, sandbox_id, {"n": 3})  # 1 + 3 > 3 per key
    assert "max_sandboxes_per_key" in assert_error(result, 429, "limit_reached")["message"]
    assert int(result.headers["retry-after"]) > 0
    assert list(manager.records) == [sandbox_id]
    assert fork(client, sandbox_id, {"n": 2}).status_code == 201  # exactly up to the limit is fine


def test_fork_or_freeze_while_code_runs_is_409(client, manager, sandbox_id):
    manager.busy.add(sandbox_id)
    assert_error(fork(client, sandbox_id), 409, "sandbox_busy")
    assert_error(client.simulate_post(f"/v1/sandboxes/{sandbox_id}/freeze", headers=A), 409, "sandbox_busy")
    assert manager.records[sandbox_id].state == "running"


def test_failed_fork_is_500_and_leaves_the_source_as_it_was(client, manager, sandbox_id):
    client.simulate_post(f"/v1/sandboxes/{sandbox_id}/exec", json={"code": "x = 1"}, headers=A)
    manager.fail_next_fork = True
    error = assert_error(fork(client, sandbox_id, {"n": 2}), 500, "internal")
    assert "keeps running unchanged" in error["message"]
    assert list(manager.records) == [sandbox_id]
    assert client.simulate_post(f"/v1/sandboxes/{sandbox_id}/exec", json={"code": "x"}, headers=A).json["text"] == "1"


def test_frozen_quota_exceeded_is_507_and_the_sandbox_keeps_running(client, manager):
    ids = [client.simulate_post("/v1/sandboxes", headers=A).json["id"] for _ in range(3)]
    for sandbox_id in ids[:2]:
        assert client.simulate_post(f"/v1/sandboxes/{sandbox_id}/freeze", headers=A).status_code == 200
    result = client.simulate_post(f"/v1/sandboxes/{ids[2]}/freeze", headers=A)
    assert "quota" in assert_error(result, 507, "insufficient_storage")["message"]
    assert manager.records[ids[2]].state == "running"


def test_unrestorable_is_422_without_a_field(client, manager, sandbox_id):
    client.simulate_post(f"/v1/sandboxes/{sandbox_id}/freeze", headers=A)
    manager.unrestorable.add(sandbox_id)
    error = assert_error(client.simulate_post(f"/v1/sandboxes/{sandbox_id}/resume", headers=A), 422, "invalid")
    assert "cannot be resumed" in error["message"] and "field" not in error
    assert manager.records[sandbox_id].state == "frozen"


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
    assert manager.create_calls[-1]["persistent"] is True
    plain = client.simulate_post("/v1/sandboxes", json={}, headers=A)
    assert plain.json["persistent"] is False


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_create_persistent_must_be_a_boolean(client, value):
    error = assert_error(client.simulate_post("/v1/sandboxes", json={"persistent": value}, headers=A), 422, "invalid")
    assert error["field"] == "persistent"


def test_create_with_a_network_policy_shows_it_with_the_identity(client, manager):
    policy = {"egress": {"allow": ["10.1.2.0/24", "db.internal:5432"]}}
    created = client.simulate_post("/v1/sandboxes", json={"network": policy}, headers=A)
    assert created.status_code == 201 and manager.create_calls[-1]["network"] == policy
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
    assert manager.create_calls == []  # refused before the manager was asked


def test_lifecycle_latency_is_measured(client, sandbox_id):
    fork(client, sandbox_id)
    client.simulate_post(f"/v1/sandboxes/{sandbox_id}/freeze", headers=A)
    client.simulate_post(f"/v1/sandboxes/{sandbox_id}/resume", headers=A)
    text = client.simulate_get("/metrics", headers=A).text
    for op in ("fork", "freeze", "resume"):
        assert f'appliance_lifecycle_seconds_count{{op="{op}"}} 1.0' in text


# ---- files -----------------------------------------------------------------------------------------------------


def test_file_round_trip_and_listing(client, manager, sandbox_id):
    data = bytes(range(256)) * 100
    files = f"/v1/sandboxes/{sandbox_id}/files"
    written = client.simulate_put(files, params={"path": "/data/blob.bin"}, body=data, headers=A)
    assert written.status_code == 200
    assert written.json == {"path": "/data/blob.bin", "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    read = client.simulate_get(files, params={"path": "/data/blob.bin"}, headers=A)
    assert read.content == data and int(read.headers["content-length"]) == len(data)
    assert read.headers["content-type"] == "application/octet-stream"
    listing = client.simulate_get(f"{files}/list", params={"path": "/data"}, headers=A).json
    assert listing == {
        "path": "/data",
        "entries": [{"name": "blob.bin", "type": "file", "size": len(data), "mtime": 0.0}],
    }


def test_upload_is_handed_on_in_chunks(tmp_path, manager):
    client = falcon.testing.TestClient(create_app(make_config(tmp_path, max_file_bytes=8 << 20), manager))
    sandbox_id = client.simulate_post("/v1/sandboxes", headers=A).json["id"]
    data = b"z" * (3 << 20)
    result = client.simulate_put(f"/v1/sandboxes/{sandbox_id}/files", params={"path": "/f"}, body=data, headers=A)
    assert result.json["size"] == len(data)
    assert len(manager.upload_chunk_sizes) >= 3 and max(manager.upload_chunk_sizes) <= 1 << 20


def test_file_path_is_required(client, sandbox_id):
    result = client.simulate_get(f"/v1/sandboxes/{sandbox_id}/files", headers=A)
    assert assert_error(result, 422, "invalid")["field"] == "path"


# ---- service routes --------------------------------------------------------------------------------------------


def test_metrics(client, sandbox_id):
    client.simulate_post(f"/v1/sandboxes/{sandbox_id}/exec", json={"code": "1"}, headers=A)
    client.simulate_post(f"/v1/sandboxes/{sandbox_id}/exec", json={"code": BUSY_CODE}, headers=A)
    text = client.simulate_get("/metrics", headers=A).text
    assert 'appliance_sandboxes{state="running"} 1.0' in text
    assert "appliance_creates_total 1.0" in text
    assert 'appliance_exec_seconds_count{language="python",mode="json"} 1.0' in text
    assert 'appliance_errors_total{code="sandbox_busy"} 1.0' in text


def test_docs_page_is_self_contained_and_lists_every_operation(client):
    result = client.simulate_get("/v1/docs")
    assert result.headers["content-type"].startswith("text/html")
    page = result.text
    assert "http://" not in page and "https://" not in page and "<script" not in page
    for path, item in openapi_document()["paths"].items():
        assert path in page
        for method in ("get", "post", "put", "delete"):
            if method in item:
                assert item[method]["summary"] in page.replace("&#x27;", "'")


def _router_operations(app: falcon.App) -> set[tuple[str, str]]:
    return {
        (route.path, method.method.lower())
        for route in falcon.inspect.inspect_routes(app)
        for method in route.methods
        if not method.internal
    }


def test_openapi_describes_exactly_the_routes_the_app_has(app, client):
    served = client.simulate_get("/v1/openapi.json").json
    assert served["openapi"].startswith("3.1")
    documented = {
        (path, method)
        for path, item in served["paths"].items()
        for method in item
        if method in {"get", "post", "put", "delete", "patch"}
    }
    routes = _router_operations(app)
    assert len(routes) == 17
    assert documented == routes


def test_openapi_refs_resolve_and_operations_are_complete(client):
    doc = client.simulate_get("/v1/openapi.json").json
    openapi_spec_validator.validate(doc)  # the OpenAPI 3.1 schema itself

    def walk(node):
        if isinstance(node, dict):
            if "$ref" in node:
                target = doc
                for part in node["$ref"].lstrip("#/").split("/"):
                    assert part in target, node["$ref"]
                    target = target[part]
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(doc)
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method == "parameters":
                continue
            assert op["summary"] and op["responses"] and op["operationId"], (path, method)
            if "{sandbox_id}" in path:
                assert "404" in op["responses"] and "401" in op["responses"]


def test_a_refused_body_is_read_off_the_connection(app, sandbox_id):
    # gunicorn drains only 64 KiB of an unread body, then drops a connection it promised to keep alive
    env = falcon.testing.create_environ(
        method="POST",
        path=f"/v1/sandboxes/{sandbox_id}/exec",
        body=b"x" * (200 << 10),
        headers=A,
    )
    statuses: list[str] = []
    b"".join(app(env, lambda status, headers: statuses.append(status)))
    assert statuses[0].startswith("413")
    assert env["wsgi.input"].read() == b""
