"""/fork, /freeze, /resume through the API, on the real manager's rules."""
from __future__ import annotations

import os
from pathlib import Path

import falcon
import falcon.inspect
import falcon.testing
import pytest

from service.api import create_app
from service.attachments import take_code_lock

from .api_helpers import A, M, assert_error, fork
from .fakes import HOST, LOST_CODE, fake_manager, make_config, states


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


def test_fork_n_over_max_fork_is_422_naming_the_setting(tmp_path):
    config = make_config(tmp_path / "small", max_fork=4)
    manager, _ = fake_manager(config)
    client = falcon.testing.TestClient(create_app(config, manager))
    sandbox_id = client.simulate_post("/v1/sandboxes", headers=A).json["id"]
    error = assert_error(fork(client, sandbox_id, {"n": 5}), 422, "invalid")
    assert error["field"] == "n" and "max_fork" in error["message"]
    assert list(states(manager)) == [sandbox_id]
    manager.close()


def test_fork_unknown_field_is_422(client, sandbox_id):
    assert assert_error(fork(client, sandbox_id, {"count": 2}), 422, "invalid")["field"] == "count"


def test_fork_over_the_sandbox_limit_is_429_with_retry_after(client, manager, sandbox_id):
    result = fork(client, sandbox_id, {"n": 3})  # 1 + 3 > 3 per key
    assert "max_sandboxes_per_key" in assert_error(result, 429, "limit_reached")["message"]
    assert int(result.headers["retry-after"]) > 0
    assert list(states(manager)) == [sandbox_id]
    assert fork(client, sandbox_id, {"n": 2}).status_code == 201  # exactly up to the limit is fine


def test_fork_without_host_memory_is_507(client, manager, sandbox_id):
    # The host keeps 2 GiB; two copies of a 256 MiB guest are counted as 128 MiB.
    manager.host_meminfo = lambda: HOST | {"MemAvailable": (2048 + 100) << 20}
    error = assert_error(fork(client, sandbox_id, {"n": 2}), 507, "insufficient_capacity")
    assert "host memory" in error["message"] and "2048 MiB is kept for the host" in error["message"]
    assert list(states(manager)) == [sandbox_id]
    manager.host_meminfo = lambda: HOST | {"MemAvailable": (2048 + 200) << 20}
    assert fork(client, sandbox_id, {"n": 2}).status_code == 201


def test_fork_or_freeze_while_code_runs_is_409(client, manager, sandbox_id):
    running = take_code_lock(Path(manager.registry.get(sandbox_id).vm_dir))  # another worker's exec holds it
    try:
        assert_error(fork(client, sandbox_id), 409, "sandbox_busy")
        assert_error(client.simulate_post(f"/v1/sandboxes/{sandbox_id}/freeze", headers=A), 409, "sandbox_busy")
        assert states(manager) == {sandbox_id: "running"}
    finally:
        os.close(running)
    assert fork(client, sandbox_id).status_code == 201


def test_failed_fork_is_500_and_leaves_the_source_as_it_was(client, manager, engine, sandbox_id):
    client.simulate_post(f"/v1/sandboxes/{sandbox_id}/exec", json={"code": "x = 1"}, headers=A)
    templates_before = sorted(engine.templates_dir.iterdir())
    engine.fail_next_fork = True
    error = assert_error(fork(client, sandbox_id, {"n": 2}), 500, "internal")
    assert "keeps running unchanged" in error["message"]
    assert list(states(manager)) == [sandbox_id] and sorted(engine.templates_dir.iterdir()) == templates_before
    assert client.simulate_post(f"/v1/sandboxes/{sandbox_id}/exec", json={"code": "x"}, headers=A).json["text"] == "1"


def test_freeze_resume_and_exec_resumes_a_frozen_sandbox(client, manager, sandbox_id):
    path = f"/v1/sandboxes/{sandbox_id}"
    client.simulate_post(f"{path}/exec", json={"code": "x = 41"}, headers=A)
    frozen = client.simulate_post(f"{path}/freeze", headers=A)
    assert frozen.status_code == 200 and frozen.json["state"] == "frozen" and frozen.json["expires_at"] is None
    assert client.simulate_post(f"{path}/freeze", headers=A).json["state"] == "frozen"  # again: a no-op
    assert client.simulate_get(path, headers=A).json["state"] == "frozen"
    resumed = client.simulate_post(f"{path}/resume", headers=A)
    assert resumed.status_code == 200 and resumed.json["state"] == "running" and resumed.json["expires_at"]
    assert client.simulate_post(f"{path}/resume", headers=A).json["state"] == "running"  # again: a no-op
    client.simulate_post(f"{path}/freeze", headers=A)
    assert client.simulate_post(f"{path}/exec", json={"code": "x + 1"}, headers=A).json["text"] == "42"
    assert client.simulate_get(path, headers=A).json["state"] == "running"


def test_fork_of_a_frozen_sandbox_resumes_it_first(client, manager, sandbox_id):
    client.simulate_post(f"/v1/sandboxes/{sandbox_id}/exec", json={"code": "x = 7"}, headers=A)
    client.simulate_post(f"/v1/sandboxes/{sandbox_id}/freeze", headers=A)
    (kid,) = fork(client, sandbox_id).json["sandboxes"]
    assert states(manager) == {sandbox_id: "running", kid["id"]: "running"}
    assert client.simulate_post(f"/v1/sandboxes/{kid['id']}/exec", json={"code": "x"}, headers=A).json["text"] == "7"


def test_frozen_quota_exceeded_is_507_and_the_sandbox_keeps_running(client, manager):
    ids = [client.simulate_post("/v1/sandboxes", headers=A).json["id"] for _ in range(3)]
    for sandbox_id in ids[:2]:
        assert client.simulate_post(f"/v1/sandboxes/{sandbox_id}/freeze", headers=A).status_code == 200
    result = client.simulate_post(f"/v1/sandboxes/{ids[2]}/freeze", headers=A)
    assert "quota" in assert_error(result, 507, "insufficient_storage")["message"]
    assert states(manager)[ids[2]] == "running"


def test_resume_over_the_limit_is_429_and_unrestorable_is_422(client, manager, engine):
    ids = [client.simulate_post("/v1/sandboxes", headers=A).json["id"] for _ in range(3)]
    client.simulate_post(f"/v1/sandboxes/{ids[0]}/freeze", headers=A)
    client.simulate_post("/v1/sandboxes", headers=A)  # takes the freed place: 3 running again
    assert_error(client.simulate_post(f"/v1/sandboxes/{ids[0]}/resume", headers=A), 429, "limit_reached")
    assert_error(client.simulate_post(f"/v1/sandboxes/{ids[0]}/exec", json={"code": "1"}, headers=A), 429,
                 "limit_reached")
    client.simulate_delete(f"/v1/sandboxes/{ids[1]}", headers=A)
    engine.unrestorable.add(ids[0])
    resume = client.simulate_post(f"/v1/sandboxes/{ids[0]}/resume", headers=A)
    error = assert_error(resume, 422, "snapshot_incompatible")
    assert "cannot be resumed" in error["message"] and "QEMU release" in error["message"] and "field" not in error
    engine.unrestorable.clear()
    engine.tampered.add(ids[0])
    error = assert_error(client.simulate_post(f"/v1/sandboxes/{ids[0]}/resume", headers=A), 422, "snapshot_invalid")
    assert "fails authentication" in error["message"] and "stays frozen" in error["message"]
    assert states(manager)[ids[0]] == "frozen"


def test_freeze_of_a_lost_sandbox_is_410(client, sandbox_id):
    client.simulate_post(f"/v1/sandboxes/{sandbox_id}/exec", json={"code": LOST_CODE}, headers=A)
    assert_error(client.simulate_post(f"/v1/sandboxes/{sandbox_id}/freeze", headers=A), 410, "sandbox_lost")
    assert_error(fork(client, sandbox_id), 410, "sandbox_lost")



def test_lifecycle_latency_is_measured(client, sandbox_id):
    fork(client, sandbox_id)
    client.simulate_post(f"/v1/sandboxes/{sandbox_id}/freeze", headers=A)
    client.simulate_post(f"/v1/sandboxes/{sandbox_id}/resume", headers=A)
    text = client.simulate_get("/metrics", headers=M).text
    for op in ("fork", "freeze", "resume"):
        assert f'appliance_lifecycle_seconds_count{{op="{op}"}} 1.0' in text
