"""Named snapshots through the API, over the real manager and registry and a fake engine: a key's snapshot is its
own (another key sees a 404 exactly like a name that never existed), sandboxes start from it with its state, it
counts against the key's frozen share, a failed one leaves the sandbox as it was, and names are never paths."""

from __future__ import annotations

from dataclasses import replace

import pytest

from service.registry import PUBLIC

from .api_helpers import A, B, assert_error


@pytest.fixture
def service_overrides() -> dict:
    return {"max_sandboxes_per_key": 6, "max_frozen_per_key": 2}


def run(client, sandbox_id: str, code: str, headers=A) -> str | None:
    result = client.simulate_post(f"/v1/sandboxes/{sandbox_id}/exec", json={"code": code}, headers=headers)
    assert result.status_code == 200, result.text
    return result.json["text"]


def snap(client, sandbox_id: str, name: str, headers=A):
    return client.simulate_post(f"/v1/sandboxes/{sandbox_id}/snapshots", json={"name": name}, headers=headers)


def create(client, headers=A, **body):
    return client.simulate_post("/v1/sandboxes", json=body, headers=headers)


def test_sandboxes_start_from_a_named_snapshot_which_the_source_outlives(client, sandbox_id):
    run(client, sandbox_id, "x = 41")
    saved = snap(client, sandbox_id, "base.v1")
    assert saved.status_code == 201, saved.text
    assert saved.headers["location"] == "/v1/snapshots/base.v1"
    assert saved.json["state"] == "ready" and saved.json["source_sandbox_id"] == sandbox_id
    assert run(client, sandbox_id, "x = 0; x") == "0"  # the source keeps running, its own from now on
    made = [create(client, snapshot="base.v1") for _ in range(3)]
    assert [m.status_code for m in made] == [201] * 3
    assert all(m.json["metadata"] == {"from_snapshot": "base.v1"} for m in made)
    assert {run(client, m.json["id"], "x + 1") for m in made} == {"42"}
    listed = client.simulate_get("/v1/snapshots", headers=A).json["snapshots"]
    assert [s["name"] for s in listed] == ["base.v1"]
    assert client.simulate_get("/v1/snapshots/base.v1", headers=A).json["name"] == "base.v1"
    for m in made:  # the snapshot outlives the sandboxes made from it, and its source
        assert client.simulate_delete(f"/v1/sandboxes/{m.json['id']}", headers=A).status_code == 204
    assert client.simulate_delete(f"/v1/sandboxes/{sandbox_id}", headers=A).status_code == 204
    again = create(client, snapshot="base.v1")
    assert again.status_code == 201, again.text
    assert run(client, again.json["id"], "x") == "41"


def test_another_key_cannot_see_or_use_a_snapshot(client, sandbox_id):
    assert snap(client, sandbox_id, "mine").status_code == 201
    never = assert_error(create(client, headers=B, snapshot="never-was"), 404, "not_found")["message"]
    theirs = assert_error(create(client, headers=B, snapshot="mine"), 404, "not_found")["message"]
    assert theirs == never.replace("never-was", "mine")  # exactly like a name that never existed
    assert client.simulate_get("/v1/snapshots", headers=B).json == {"snapshots": []}
    assert_error(client.simulate_get("/v1/snapshots/mine", headers=B), 404, "not_found")
    assert_error(client.simulate_delete("/v1/snapshots/mine", headers=B), 404, "not_found")
    assert snap(client, create(client, headers=B).json["id"], "mine", headers=B).status_code == 201  # its own
    assert client.simulate_get("/v1/snapshots/mine", headers=A).json["source_sandbox_id"] == sandbox_id


def test_a_deleted_snapshot_is_gone_and_its_memory_goes_with_its_last_sandbox(client, sandbox_id, manager):
    assert snap(client, sandbox_id, "s").status_code == 201
    made = create(client, snapshot="s").json["id"]
    template = manager.registry.snapshot(_owner(manager), "s")
    directory = manager.config.templates_dir / template.template_id
    assert client.simulate_delete("/v1/snapshots/s", headers=A).status_code == 204
    assert_error(client.simulate_get("/v1/snapshots/s", headers=A), 404, "not_found")
    assert_error(create(client, snapshot="s"), 404, "not_found")
    assert client.simulate_get("/v1/snapshots", headers=A).json == {"snapshots": []}
    assert directory.is_dir() and run(client, made, "1") == "1"  # still mapped by the sandbox made from it
    assert client.simulate_delete(f"/v1/sandboxes/{made}", headers=A).status_code == 204
    assert not directory.exists()
    assert snap(client, sandbox_id, "s").status_code == 201  # the name is free again


def _owner(manager) -> str:
    return manager.registry.list()[0].owner


def test_snapshots_count_against_the_keys_frozen_share(client, sandbox_id):
    assert snap(client, sandbox_id, "one").status_code == 201
    other = create(client).json["id"]
    assert client.simulate_post(f"/v1/sandboxes/{other}/freeze", headers=A).status_code == 200
    refused = snap(client, sandbox_id, "three")  # share 2: one snapshot and one frozen sandbox
    assert "max_frozen_per_key" in assert_error(refused, 429, "limit_reached")["message"]
    assert refused.headers.get("retry-after")
    assert [s["name"] for s in client.simulate_get("/v1/snapshots", headers=A).json["snapshots"]] == ["one"]
    assert client.simulate_delete("/v1/snapshots/one", headers=A).status_code == 204
    assert snap(client, sandbox_id, "three").status_code == 201


def test_a_snapshot_past_the_frozen_quota_is_refused(client, sandbox_id, manager):
    manager.config = replace(manager.config, frozen_quota_bytes=200 << 20)  # less than the guest's 256 MiB
    assert "frozen_quota_bytes" in assert_error(snap(client, sandbox_id, "big"), 507, "insufficient_storage")[
        "message"]
    assert client.simulate_get("/v1/snapshots", headers=A).json == {"snapshots": []}


def test_a_failed_snapshot_leaves_the_sandbox_as_it_was_and_no_snapshot(client, sandbox_id, engine):
    run(client, sandbox_id, "x = 7")
    engine.fail_next_snapshot = True
    failed = snap(client, sandbox_id, "s")
    assert "keeps running unchanged" in assert_error(failed, 500, "internal")["message"]
    assert client.simulate_get("/v1/snapshots", headers=A).json == {"snapshots": []}
    assert client.simulate_get(f"/v1/sandboxes/{sandbox_id}", headers=A).json["state"] == "running"
    assert run(client, sandbox_id, "x") == "7"
    assert snap(client, sandbox_id, "s").status_code == 201  # nothing of the failed one is in the way


def test_a_name_is_taken_once_per_key(client, sandbox_id):
    assert snap(client, sandbox_id, "s").status_code == 201
    assert_error(snap(client, sandbox_id, "s"), 409, "snapshot_exists")


@pytest.mark.parametrize("name", ["", "../etc", "a/b", ".hidden", "x" * 65, "é", "a b", "-x"])
def test_names_are_validated_and_never_paths(client, sandbox_id, name):
    assert assert_error(snap(client, sandbox_id, name), 422, "invalid")["field"] == "name"
    assert assert_error(create(client, snapshot=name), 422, "invalid")["field"] == "snapshot"


@pytest.mark.parametrize("path", ["..", ".x", "a~b", "x" * 65])
def test_a_bad_name_in_the_path_is_422(client, path):
    assert assert_error(client.simulate_get(f"/v1/snapshots/{path}", headers=A), 422, "invalid")["field"] == "name"
    assert assert_error(client.simulate_delete(f"/v1/snapshots/{path}", headers=A), 422, "invalid")


def test_a_snapshots_sandboxes_have_its_size(client, sandbox_id):
    assert snap(client, sandbox_id, "s").status_code == 201
    for field, value in (("vcpus", 2), ("memory_mib", 512), ("template", "default")):
        assert assert_error(create(client, snapshot="s", **{field: value}), 422, "invalid")["field"] == field


def test_a_published_template_is_every_keys(client, sandbox_id, manager):
    run(client, sandbox_id, "x = 5")
    assert snap(client, sandbox_id, "s").status_code == 201
    manager.registry.publish_snapshot(manager.registry.snapshots(_owner(manager))[0], "team-base")
    for headers in (A, B):
        made = create(client, headers=headers, template="team-base")
        assert made.status_code == 201 and made.json["metadata"] == {"from_template": "team-base"}
        assert run(client, made.json["id"], "x * 2", headers=headers) == "10"
    assert [s.name for s in manager.registry.snapshots(PUBLIC)] == ["team-base"]
    assert client.simulate_get("/v1/snapshots", headers=B).json == {"snapshots": []}  # not a key's snapshot


def test_a_snapshot_needs_free_space_where_it_is_written(client, sandbox_id, manager):
    asked = []
    manager.disk_free = lambda path: asked.append(path) or (256 + 63) << 20  # the guest's 256 MiB + 64 MiB, less 1
    refused = assert_error(snap(client, sandbox_id, "s"), 507, "insufficient_capacity")["message"]
    assert "not enough memory filesystem for the snapshot: need 320 MiB, 319 MiB free" in refused
    assert asked == [manager.config.templates_dir]  # the run directory's tmpfs, where copies map it from
    assert client.simulate_get("/v1/snapshots", headers=A).json == {"snapshots": []}
    manager.disk_free = lambda path: 320 << 20
    assert snap(client, sandbox_id, "s").status_code == 201
