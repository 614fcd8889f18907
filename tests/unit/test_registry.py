"""The registry's record keeping (concurrency is in test_registry_threads.py)."""

from __future__ import annotations

import os
import time

from service.registry import FROZEN, RUNNING, Registry, SandboxRecord


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
