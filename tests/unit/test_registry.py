"""The registry's record keeping (concurrency is in test_registry_threads.py)."""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import replace

import falcon.testing

from service.api import create_app
from service.registry import FROZEN, RUNNING, Registry, SandboxRecord
from service.settings import owner_ids

from .api_helpers import A
from .fakes import KEY_A, KEY_B, fake_manager, key_id, make_config


def test_add_stamps_the_record_it_was_given(tmp_path):
    # Create and fork hand the record they added straight to the API: it must carry real times, not the epoch.
    registry = Registry(tmp_path / "registry.sqlite3")
    record = SandboxRecord(id="sb-1", owner="o", state=RUNNING, vm_dir="/x", template_id=None, machine={},
                           timeout_s=60)
    before = time.time()
    registry.add(record)
    assert before <= record.created_at == record.last_active_at <= time.time()
    stored = registry.get("sb-1")
    assert (stored.created_at, stored.last_active_at) == (record.created_at, record.last_active_at)
    registry.close()


def test_list_filters_by_owner_and_state(tmp_path):
    registry = Registry(tmp_path / "registry.sqlite3")
    for i, (owner, state) in enumerate([("a", RUNNING), ("a", FROZEN), ("b", FROZEN)]):
        registry.add(SandboxRecord(id=f"sb-{i}", owner=owner, state=state, vm_dir="/x", template_id=None,
                                   machine={}, timeout_s=60))
    assert [r.id for r in registry.list(owner="a", state=FROZEN)] == ["sb-1"]
    assert [r.id for r in registry.list(state=FROZEN)] == ["sb-1", "sb-2"]
    assert registry.count("a") == 1  # limits count running sandboxes only
    registry.close()


def test_the_registry_is_private_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        registry = Registry(tmp_path / "state" / "registry.sqlite3")
        registry.add(SandboxRecord(id="sb-1", owner="o", state=RUNNING, vm_dir="/x", template_id=None, machine={},
                                   timeout_s=60))
    finally:
        os.umask(old)
    files = sorted(tmp_path.glob("state/registry.sqlite3*"))
    assert files and {f.stat().st_mode & 0o777 for f in files} == {0o600}  # the WAL and shm files too
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700
    registry.close()


def test_an_older_registry_with_hash_owned_rows_moves_to_key_ids_on_open(tmp_path):
    # Before key ids a sandbox's owner was the SHA-256 of its key: such rows (running and frozen) must stay their
    # key's, now under its id, and no unsalted hash of a configured key may remain in the registry.
    config = make_config(tmp_path)
    old = Registry(config.registry_path)
    for sandbox_id, state, key in [("sb-run", RUNNING, KEY_A), ("sb-frozen", FROZEN, KEY_A), ("sb-b", RUNNING, KEY_B),
                                   ("sb-gone", RUNNING, "a-key-no-longer-configured")]:
        old.add(SandboxRecord(id=sandbox_id, owner=hashlib.sha256(key.encode()).hexdigest(), state=state,
                              vm_dir="/x", template_id=None, machine={}, timeout_s=60))
    old.close()
    manager, _ = fake_manager(config)
    try:
        owners = {record.id: record.owner for record in manager.registry.list()}
        assert owners["sb-run"] == owners["sb-frozen"] == key_id(config, KEY_A)
        assert owners["sb-b"] == key_id(config, KEY_B)
        assert owners["sb-gone"].startswith("orphan_")  # a key not configured now: no unsalted hash stays
        assert hashlib.sha256(b"a-key-no-longer-configured").hexdigest() not in owners["sb-gone"]
        client = falcon.testing.TestClient(create_app(config, manager))
        listed = client.simulate_get("/v1/sandboxes", headers=A).json["sandboxes"]
        assert sorted(s["id"] for s in listed) == ["sb-frozen", "sb-run"]
        assert manager.registry.migrate_owners(owner_ids(config, manager.registry.owners())) == 0  # done once
    finally:
        manager.close()
    # The orphan's key configured again later: its rows come back to it.
    returned = replace(config, api_keys=(*config.api_keys, "a-key-no-longer-configured"))
    manager, _ = fake_manager(returned)
    try:
        assert manager.registry.get("sb-gone").owner == key_id(config, "a-key-no-longer-configured")
    finally:
        manager.close()

