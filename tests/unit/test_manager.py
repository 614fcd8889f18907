"""The real SandboxManager's rules against a fake engine (tests/unit/fakes.py): owners, limits, states, the pool
hand-out, fork/freeze/resume policy, what two processes sharing a registry see, and engine failures mapped to
service errors. The API tests (test_api_*.py) meet the same rules through HTTP; these are the ones HTTP hides."""

from __future__ import annotations

import errno
import os
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from service.attachments import take_code_lock
from service.engine import EngineError
from service.errors import (
    Busy,
    InsufficientCapacity,
    InsufficientStorage,
    Invalid,
    LimitReached,
    NetworkUnavailable,
    NotFound,
    NotReady,
    ServiceError,
    SnapshotIncompatible,
    SnapshotInvalid,
)
from service.manager import FREEZE_DISK_MARGIN_MIB, SandboxManager
from service.registry import FROZEN, LOST, POOLED, RUNNING, TOUCH_EVERY_S, Registry, SandboxRecord

from .fakes import HOST, LOST_CODE, FakeEngine

OWNER, OTHER = "owner-hash", "other-hash"


@pytest.fixture
def service_overrides() -> dict:
    return {"max_sandboxes_per_key": 3, "max_sandboxes": 5}


@pytest.fixture
def warm_namespace() -> dict:
    return {"warm": 41}


def second_process(manager: SandboxManager, engine: FakeEngine) -> SandboxManager:
    """Another API worker: its own manager, attachments and registry connection; the same VMs and files."""
    other = SandboxManager(manager.config, engine=engine, registry=Registry(manager.config.registry_path),
                           host_meminfo=manager.host_meminfo)
    other.host_cpus = manager.host_cpus
    return other


def run(manager: SandboxManager, sandbox_id: str, code: str, owner: str = OWNER) -> str | None:
    return manager.exec(owner, sandbox_id, code).text


def pool_one(manager: SandboxManager, engine: FakeEngine) -> SandboxRecord:
    """What the pool keeper does: a clone of the published template, registered as pooled."""
    template = manager.templates.current()
    assert template is not None
    sandbox = engine.clone(template, "pooled-1")
    sandbox.detach()
    record = SandboxRecord(id="sb-pooled", owner=None, state=POOLED, vm_dir=str(sandbox.vm_dir),
                           template_id=template.template_id, machine=engine.machine_json(sandbox), timeout_s=60)
    manager.registry.add(record)
    return record


# ---- creating ------------------------------------------------------------------------------------------------


def test_a_create_starts_from_the_warm_template(manager):
    record = manager.create(OWNER)
    assert record.state == RUNNING and record.owner == OWNER and record.template_id
    assert run(manager, record.id, "warm + 1") == "42"


def test_a_create_hands_out_a_pooled_clone_first(manager, engine):
    pooled = pool_one(manager, engine)
    record = manager.create(OWNER, metadata={"who": "me"})
    assert record.id == pooled.id and record.owner == OWNER and record.metadata == {"who": "me"}
    assert manager.registry.count(states=(POOLED,)) == 0
    assert manager.create(OWNER).id != pooled.id  # the pool is empty now: a fresh clone


def test_an_unusable_pooled_clone_is_dropped_and_a_fresh_one_made(manager, engine):
    pooled = pool_one(manager, engine)
    engine.stop(Path(pooled.vm_dir), pooled.machine)  # its VM died while it waited in the pool
    record = manager.create(OWNER)
    assert record.vm_dir != pooled.vm_dir  # a fresh clone took the place (and id) the dead one had
    assert [(r.id, r.state) for r in manager.registry.list()] == [(record.id, RUNNING)]
    assert run(manager, record.id, "warm") == "41"


def test_no_create_before_a_template_is_warm(manager, engine):
    engine.unpublish_template(manager.templates)
    assert manager.readiness() is not None
    with pytest.raises(NotReady):
        manager.create(OWNER)


def test_readiness_names_why_the_pool_keeper_failed_until_a_template_is_warm(manager, engine):
    template = manager.templates.current()
    engine.unpublish_template(manager.templates)
    manager.templates.record_failure("PermissionError: [Errno 13] Permission denied: 'memory'")
    assert "Permission denied" in manager.readiness()
    manager.templates.publish(template)
    manager.templates.clear_failure()
    assert manager.readiness() is None
    engine.unpublish_template(manager.templates)
    assert "still booting" in manager.readiness()  # a cleared failure is not reported again
    other_size = manager.create(OWNER, memory_mib=512)  # a size of its own boots without the template
    assert other_size.template_id is None and other_size.machine["memory_mib"] == 512


def test_limits_per_key_and_per_host(manager):
    for _ in range(3):
        manager.create(OWNER)
    with pytest.raises(LimitReached, match="max_sandboxes_per_key"):
        manager.create(OWNER)
    manager.create(OTHER)
    manager.create(OTHER)
    with pytest.raises(LimitReached, match="max_sandboxes") as host_full:
        manager.create("third-key")  # 5 running on the host, whoever holds them
    assert "max_sandboxes_per_key" not in str(host_full.value)


def test_a_frozen_sandbox_does_not_count_until_it_is_resumed(manager):
    ids = [manager.create(OWNER).id for _ in range(3)]
    manager.freeze(OWNER, ids[0])
    manager.create(OWNER)
    with pytest.raises(LimitReached):
        manager.resume(OWNER, ids[0])
    with pytest.raises(LimitReached):  # an exec resumes first, so it is refused the same way
        manager.exec(OWNER, ids[0], "1")
    assert manager.get(OWNER, ids[0]).state == FROZEN


def test_another_keys_sandbox_does_not_exist_for_it(manager):
    record = manager.create(OWNER)
    for call in (manager.get, manager.delete, manager.freeze, manager.resume, manager.interrupt):
        with pytest.raises(NotFound):
            call(OTHER, record.id)
    with pytest.raises(NotFound):
        manager.fork(OTHER, record.id, 1)
    assert manager.list(OTHER) == [] and [r.id for r in manager.list(OWNER)] == [record.id]


def test_a_network_policy_is_checked_before_anything_starts(manager, engine):
    with pytest.raises(Invalid, match="egress"):
        manager.create(OWNER, network_policy={"egress": "everything"})
    engine.network_unavailable = "no nftables here"
    with pytest.raises(NetworkUnavailable, match="no nftables"):
        manager.create(OWNER, network_policy={"egress": "none"})
    assert manager.registry.list() == [] and engine.vms == {}


# ---- fork, freeze, resume ----------------------------------------------------------------------------------------


def test_fork_copies_state_and_its_template_goes_with_the_last_copy(manager):
    source = manager.create(OWNER)
    run(manager, source.id, "x = [1]")
    kids = manager.fork(OWNER, source.id, 2)
    assert [kid.metadata["forked_from"] for kid in kids] == [source.id, source.id]
    run(manager, kids[0].id, "x.append(2)")
    assert [run(manager, kid.id, "x") for kid in kids] == ["[1, 2]", "[1]"] and run(manager, source.id, "x") == "[1]"
    template_dir = manager.config.templates_dir / kids[0].template_id
    manager.delete(OWNER, kids[0].id)
    assert template_dir.exists()  # the other copy still maps it
    manager.delete(OWNER, kids[1].id)
    assert not template_dir.exists()


def test_fork_counts_the_copies_against_the_limits(manager):
    source = manager.create(OWNER)
    with pytest.raises(LimitReached):
        manager.fork(OWNER, source.id, 3)
    assert len(manager.fork(OWNER, source.id, 2)) == 2


def test_the_host_keeps_its_reserve_counting_a_quarter_of_each_new_guest(manager):
    source = manager.create(OWNER)
    manager.host_meminfo = lambda: HOST | {"MemAvailable": (2048 + 127) << 20}  # 2 copies of 256 MiB: 128 MiB
    with pytest.raises(InsufficientCapacity, match="host memory") as short:
        manager.fork(OWNER, source.id, 2)
    assert short.value.status == 507 and "2048 MiB is kept for the host" in str(short.value)
    with pytest.raises(InsufficientCapacity):
        manager.create(OWNER, memory_mib=1024)  # a create likewise: 256 MiB of a 1 GiB guest
    manager.config = replace(manager.config, memory_reserve_mib=1024)  # the operator's own reserve
    assert len(manager.fork(OWNER, source.id, 2)) == 2
    manager.host_meminfo = dict  # no /proc/meminfo at all: not refused on a guess
    manager.delete(OWNER, source.id)
    assert manager.create(OWNER, memory_mib=1024).state == RUNNING


def test_committed_guest_memory_is_bounded_by_the_overcommit_ratio(manager, engine):
    # 4 × (8 GiB - 2 GiB reserve) = 24 GiB of guest memory; the warm template's clones are 256 MiB each.
    manager.config = replace(manager.config, memory_overcommit=0.125, max_sandboxes=50)  # 768 MiB
    first, second = manager.create(OWNER), manager.create(OTHER)
    assert manager.registry.committed_mib() == 512
    with pytest.raises(InsufficientCapacity, match="512 MiB of guest memory is committed"):
        manager.create(OWNER, memory_mib=512)
    third = manager.create("third-key")
    with pytest.raises(InsufficientCapacity):
        manager.fork(OWNER, first.id, 1)
    manager.freeze(OTHER, second.id)  # a frozen sandbox commits disk, not memory
    assert len(manager.fork(OWNER, first.id, 1)) == 1
    assert third.state == RUNNING
    pool_one(manager, engine)  # pooled clones are running VMs: they count too
    assert manager.registry.committed_mib() == 4 * 256 and not manager.has_room(256)


def test_concurrent_creates_are_admitted_exactly_up_to_the_limit(manager, engine):
    """Count and reserve in one transaction: 8 creates at once against a limit of 3 admit exactly 3."""
    workers = [second_process(manager, engine) for _ in range(8)]
    start = threading.Barrier(len(workers))
    outcomes: list[str] = []

    def create(worker: SandboxManager) -> None:
        start.wait()
        try:
            worker.create(OWNER)
            outcomes.append("created")
        except LimitReached:
            outcomes.append("refused")

    threads = [threading.Thread(target=create, args=(worker,)) for worker in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(outcomes) == ["created"] * 3 + ["refused"] * 5
    assert manager.registry.count(OWNER) == 3 and len(manager.list(OWNER)) == 3
    for worker in workers:
        worker.close()


def test_vcpus_are_bounded_by_their_own_overcommit_ratio(manager):
    # 1.5 × 2 host CPUs = 3 vCPUs; the template's clones have 1 each, and memory has room for many more.
    manager.config = replace(manager.config, vcpu_overcommit=1.5, max_sandboxes=50)
    manager.host_cpus = lambda: 2
    first, second = manager.create(OWNER), manager.create(OTHER)
    with pytest.raises(InsufficientCapacity, match="vCPU") as short:
        manager.create(OWNER, vcpus=2)
    message = str(short.value)
    assert short.value.status == 507 and "service.vcpu_overcommit × 2 host CPUs" in message
    assert "2 vCPUs are committed" in message and "memory" not in message
    with pytest.raises(InsufficientCapacity, match="vCPU"):
        manager.fork(OWNER, first.id, 2)
    assert len(manager.fork(OWNER, first.id, 1)) == 1  # the third vCPU
    manager.freeze(OTHER, second.id)  # a frozen sandbox has no vCPUs
    third = manager.create("third-key")
    with pytest.raises(InsufficientCapacity, match="vCPU"):
        manager.resume(OTHER, second.id)
    assert manager.get(OTHER, second.id).state == FROZEN
    manager.delete("third-key", third.id)
    assert manager.resume(OTHER, second.id).state == RUNNING


def test_concurrent_resumes_are_admitted_exactly_up_to_the_limit(manager, engine):
    """Resume counts and reserves in one transaction too: 3 frozen sandboxes resumed at once by 3 workers, with room
    for 1 under the key's limit (3): exactly 1 runs, the others stay frozen."""
    manager.config = replace(manager.config, frozen_quota_bytes=4 << 30)
    frozen = [manager.create(OWNER).id for _ in range(3)]
    for sandbox_id in frozen:
        manager.freeze(OWNER, sandbox_id)
    manager.create(OWNER), manager.create(OWNER)
    workers = [second_process(manager, engine) for _ in frozen]
    entered, refused, outcomes = [], [], []
    real_resume = engine.resume

    def resume_when_all_decided(directory: Path, vm_id: str):
        # Every resume that got past admission waits here until each request was admitted or refused: a check
        # made before any of them is stored would let all of them in.
        entered.append(vm_id)
        deadline = time.monotonic() + 60
        while len(entered) + len(refused) < len(workers) and time.monotonic() < deadline:
            time.sleep(0.01)
        return real_resume(directory, vm_id)

    engine.resume = resume_when_all_decided
    start = threading.Barrier(len(workers))

    def resume(worker: SandboxManager, sandbox_id: str) -> None:
        start.wait()
        try:
            outcomes.append(worker.resume(OWNER, sandbox_id).state)
        except LimitReached:
            refused.append(sandbox_id)
            outcomes.append("refused")

    threads = [threading.Thread(target=resume, args=pair) for pair in zip(workers, frozen, strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(outcomes) == ["refused", "refused", RUNNING]
    assert manager.registry.count(OWNER) == 3
    assert sorted(manager.get(OWNER, sandbox_id).state for sandbox_id in frozen) == [FROZEN, FROZEN, RUNNING]
    assert all(manager.snapshot_dir(sandbox_id).is_dir() for sandbox_id in refused)
    for worker in workers:
        worker.close()


def test_a_failed_fork_leaves_the_source_running_and_nothing_new(manager, engine):
    source = manager.create(OWNER)
    run(manager, source.id, "x = 1")
    engine.fail_next_fork = True
    with pytest.raises(ServiceError, match="keeps running unchanged"):
        manager.fork(OWNER, source.id, 2)
    assert [r.id for r in manager.registry.list()] == [source.id] and run(manager, source.id, "x") == "1"


def test_freeze_and_resume_keep_state_and_are_idempotent(manager):
    record = manager.create(OWNER)
    run(manager, record.id, "x = 41")
    assert manager.freeze(OWNER, record.id).state == FROZEN
    assert manager.freeze(OWNER, record.id).state == FROZEN  # again: nothing to do
    snapshot = manager.snapshot_dir(record.id)
    assert snapshot.is_dir()
    assert manager.resume(OWNER, record.id).state == RUNNING
    assert not snapshot.exists()  # a resumed sandbox's snapshot is gone
    assert manager.resume(OWNER, record.id).state == RUNNING
    assert run(manager, record.id, "x + 1") == "42"


def test_freeze_refuses_past_the_frozen_quota_and_the_sandbox_keeps_running(manager):
    ids = [manager.create(OWNER).id for _ in range(3)]  # quota: 600 MiB, each snapshot up to 256 MiB
    manager.freeze(OWNER, ids[0])
    manager.freeze(OWNER, ids[1])
    with pytest.raises(ServiceError, match="quota") as full:
        manager.freeze(OWNER, ids[2])
    assert full.value.status == 507 and manager.get(OWNER, ids[2]).state == RUNNING
    assert run(manager, ids[2], "1") == "1"


def test_freeze_needs_free_disk_for_the_guests_ram_and_else_the_sandbox_keeps_running(manager):
    record = manager.create(OWNER)
    run(manager, record.id, "x = 41")
    asked: list[Path] = []
    need_mib = 256 + FREEZE_DISK_MARGIN_MIB
    manager.disk_free = lambda path: asked.append(path) or (need_mib - 1) << 20
    with pytest.raises(InsufficientCapacity) as short:
        manager.freeze(OWNER, record.id)
    assert short.value.status == 507 and short.value.code == "insufficient_capacity"
    assert f"not enough disk to freeze: need {need_mib} MiB, {need_mib - 1} MiB free" in str(short.value)
    assert asked == [manager.config.state_dir / "snapshots"]  # the filesystem the snapshot would be written to
    assert manager.get(OWNER, record.id).state == RUNNING and not manager.snapshot_dir(record.id).exists()
    assert run(manager, record.id, "x + 1") == "42"
    manager.disk_free = lambda path: need_mib << 20
    assert manager.freeze(OWNER, record.id).state == FROZEN


def test_one_key_cannot_take_the_whole_frozen_quota(manager):
    manager.config = replace(manager.config, max_frozen_per_key=1)  # the quota (600 MiB) holds two
    mine, theirs = [manager.create(OWNER).id for _ in range(2)], manager.create(OTHER).id
    manager.freeze(OWNER, mine[0])
    with pytest.raises(LimitReached, match=r"1 frozen sandboxes \(service.max_frozen_per_key\)"):
        manager.freeze(OWNER, mine[1])
    assert manager.get(OWNER, mine[1]).state == RUNNING and run(manager, mine[1], "1") == "1"
    assert manager.freeze(OTHER, theirs).state == FROZEN  # the other key's share is its own
    manager.resume(OWNER, mine[0])
    assert manager.freeze(OWNER, mine[1]).state == FROZEN  # a resumed one gives its share back


def test_concurrent_freezes_are_admitted_exactly_up_to_the_keys_frozen_share(manager, engine):
    """The frozen share is checked and reserved in one transaction (FREEZING): 3 freezes at once by 3 workers with
    a share of 1 freeze exactly one; the refused ones keep running, and a freeze that fails gives its place back."""
    manager.config = replace(manager.config, max_frozen_per_key=1, frozen_quota_bytes=4 << 30)
    ids = [manager.create(OWNER).id for _ in range(3)]
    workers = [second_process(manager, engine) for _ in ids]
    entered, refused, outcomes = [], [], []
    real_freeze = engine.freeze

    def freeze_when_all_decided(sandbox, directory: Path, compress: bool, networked: bool):
        entered.append(directory.name)
        deadline = time.monotonic() + 60
        while len(entered) + len(refused) < len(workers) and time.monotonic() < deadline:
            time.sleep(0.01)
        return real_freeze(sandbox, directory, compress, networked)

    engine.freeze = freeze_when_all_decided
    start = threading.Barrier(len(workers))

    def freeze(worker: SandboxManager, sandbox_id: str) -> None:
        start.wait()
        try:
            outcomes.append(worker.freeze(OWNER, sandbox_id).state)
        except LimitReached:
            refused.append(sandbox_id)
            outcomes.append("refused")

    threads = [threading.Thread(target=freeze, args=pair) for pair in zip(workers, ids, strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(outcomes) == [FROZEN, "refused", "refused"]
    assert all(manager.get(OWNER, sandbox_id).state == RUNNING for sandbox_id in refused)
    assert run(manager, refused[0], "1") == "1"
    for worker in workers:
        worker.close()


def test_a_failed_freeze_gives_its_reservation_back(manager, engine):
    manager.config = replace(manager.config, max_frozen_per_key=1)
    record = manager.create(OWNER)
    run(manager, record.id, "x = 1")

    def fail(*args, **kwargs):
        raise EngineError("injected: the state was not written")

    real_freeze, engine.freeze = engine.freeze, fail
    with pytest.raises(ServiceError, match="keeps running"):
        manager.freeze(OWNER, record.id)
    assert manager.registry.get(record.id).state == RUNNING and run(manager, record.id, "x") == "1"
    engine.freeze = real_freeze
    assert manager.freeze(OWNER, record.id).state == FROZEN  # the share is free again


def test_an_unrestorable_snapshot_stays_frozen(manager, engine):
    record = manager.create(OWNER)
    manager.freeze(OWNER, record.id)
    engine.unrestorable.add(record.id)
    with pytest.raises(SnapshotIncompatible, match="cannot be resumed"):
        manager.resume(OWNER, record.id)
    engine.unrestorable.clear()
    engine.tampered.add(record.id)
    with pytest.raises(SnapshotInvalid, match="fails authentication"):
        manager.resume(OWNER, record.id)
    assert manager.get(OWNER, record.id).state == FROZEN and manager.snapshot_dir(record.id).is_dir()
    assert len(engine.vms) == 0  # nothing was started for either


def test_a_lost_sandbox_is_reported_lost_and_cannot_be_forked_or_frozen(manager):
    record = manager.create(OWNER)
    lost = manager.exec(OWNER, record.id, LOST_CODE)
    assert lost.error["name"] == "SandboxLost"
    assert manager.get(OWNER, record.id).state == LOST
    for call in (lambda: manager.freeze(OWNER, record.id), lambda: manager.fork(OWNER, record.id, 1),
                 lambda: manager.exec(OWNER, record.id, "1")):
        with pytest.raises(ServiceError) as gone:
            call()
        assert gone.value.status == 410
    manager.delete(OWNER, record.id)
    assert manager.list(OWNER) == []


def test_a_vm_that_died_unnoticed_makes_fork_and_freeze_410(manager, engine):
    record = manager.create(OWNER)
    engine.stop(Path(record.vm_dir), record.machine)  # killed from outside; the keeper has not looked yet
    with pytest.raises(ServiceError) as gone:
        manager.freeze(OWNER, record.id)
    assert gone.value.status == 410 and manager.get(OWNER, record.id).state == LOST


# ---- several processes -----------------------------------------------------------------------------------------


def test_execs_and_file_calls_write_nothing_to_the_registry(manager):
    record = manager.create(OWNER)
    statements: list[str] = []
    manager.registry._db.set_trace_callback(statements.append)
    for _ in range(5):
        run(manager, record.id, "x = 1")
    manager.write_file(OWNER, record.id, "f", [b"data"])
    manager.read_file(OWNER, record.id, "f")
    writes = [sql for sql in statements if sql.split()[0].upper() in {"UPDATE", "INSERT", "DELETE", "REPLACE"}]
    assert writes == [] and statements  # it was listening: the calls read their record


def test_an_idle_sandbox_is_reaped_only_when_no_worker_used_it_within_its_lifetime(manager, engine):
    """Each worker writes a sandbox's last use only when its own last write is TOUCH_EVERY_S old; the reaper gives
    that much grace. A sandbox a worker used without writing it down is not reaped early, whichever worker did."""
    record = manager.create(OWNER, timeout_s=60)
    base = time.time()
    other = second_process(manager, engine)

    def use(worker: SandboxManager, at: float) -> float:
        worker.clock = lambda: base + at
        run(worker, record.id, "1")
        return manager.registry.get(record.id).last_active_at - base

    assert use(other, 10) == pytest.approx(10)  # its first use in that worker is written
    assert use(other, 14) == pytest.approx(10)  # within TOUCH_EVERY_S of its last write: not written
    last_use = 14
    assert manager.registry.idle_since(base + last_use + 60 - 0.5) == []
    assert manager.registry.idle_since(base + last_use + 60 + 0.5) == []  # still inside the grace
    assert manager.registry.idle_since(base + 10 + 60 + TOUCH_EVERY_S + 0.5)[0].id == record.id
    assert use(manager, 30) == pytest.approx(30)
    assert use(other, 25) == pytest.approx(30)  # a worker's older stamp never moves the time back
    other.close()


def test_code_runs_one_at_a_time_across_processes(manager, engine):
    record = manager.create(OWNER)
    other = second_process(manager, engine)
    held = take_code_lock(Path(record.vm_dir))  # an exec in another worker
    try:
        for call in (lambda m: m.exec(OWNER, record.id, "1"), lambda m: m.fork(OWNER, record.id, 1),
                     lambda m: m.freeze(OWNER, record.id)):
            for process in (manager, other):
                with pytest.raises(Busy):
                    call(process)
    finally:
        os.close(held)
    assert run(other, record.id, "2") == "2"
    other.close()


def test_a_sandbox_resumed_by_another_process_is_reached_at_its_new_vm(manager, engine):
    record = manager.create(OWNER)
    run(manager, record.id, "x = 5")  # this process is attached to the first VM
    other = second_process(manager, engine)
    other.freeze(OWNER, record.id)
    other.resume(OWNER, record.id)
    assert manager.get(OWNER, record.id).vm_dir != record.vm_dir
    assert run(manager, record.id, "x") == "5"  # re-attached to the new VM, not the stale connection
    other.close()


def test_each_process_takes_its_own_agent_port(manager, engine):
    record = manager.create(OWNER)
    workers = [second_process(manager, engine) for _ in range(2)]
    for worker in workers:
        run(worker, record.id, "1")
    locks = sorted(p.name for p in Path(record.vm_dir).glob("agent-*.lock"))
    assert locks == ["agent-1.lock", "agent-2.lock"]
    run(manager, record.id, "1")  # port 3
    fourth = second_process(manager, engine)
    with pytest.raises(Busy, match="every connection"):  # 4 ports, port 0 belongs to whoever started the VM
        run(fourth, record.id, "1")
    for worker in (*workers, fourth):
        worker.close()


def test_delete_removes_the_vm_the_snapshot_and_the_record(manager, engine):
    running, frozen = manager.create(OWNER), manager.create(OWNER)
    manager.freeze(OWNER, frozen.id)
    manager.delete(OWNER, running.id)
    manager.delete(OWNER, frozen.id)
    assert engine.vms == {} and manager.registry.list() == []
    assert not manager.snapshot_dir(frozen.id).exists()
    with pytest.raises(NotFound):
        manager.get(OWNER, running.id)


def test_config_changes_apply_to_the_next_call(manager):
    manager.config = replace(manager.config, max_sandboxes_per_key=1)
    manager.create(OWNER)
    with pytest.raises(LimitReached):
        manager.create(OWNER)


@pytest.mark.parametrize(("total_gib", "reserve_mib"), [(3, 1536), (24, 2457.6), (64, 6553.6)])
def test_the_default_reserve_is_2_gib_or_a_tenth_but_never_more_than_half_the_host(manager, total_gib, reserve_mib):
    assert manager._host_reserve_mib(total_gib * 1024) == pytest.approx(reserve_mib)
    manager.config = replace(manager.config, memory_reserve_mib=100)
    assert manager._host_reserve_mib(total_gib * 1024) == 100


def test_the_pool_keeper_gives_a_slow_template_boot_more_time_on_each_try():
    from service.pool import boot_deadlines

    assert boot_deadlines(60.0) == [60.0, 120.0, 240.0, 480.0, 600.0]
    assert boot_deadlines(600.0) == [600.0]
    assert boot_deadlines(45.0, cap_s=100.0) == [45.0, 90.0, 100.0]

@pytest.mark.parametrize("failure", [
    EngineError("saving VM state failed: Unable to write to file: No space left on device"),  # as QEMU says it
    OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),  # the fsync or the metadata write
], ids=["qemu", "oserror"])
def test_a_disk_that_fills_during_a_freeze_is_507_and_the_sandbox_keeps_running(manager, engine, monkeypatch,
                                                                                failure):
    """(tests/reliability/test_faults.py fills a real small disk during a live freeze.) Anything else stays a 500."""
    record = manager.create(OWNER)
    run(manager, record.id, "x = 41")

    def full(*args, **kwargs):
        raise failure

    monkeypatch.setattr(engine, "freeze", full)
    with pytest.raises(InsufficientStorage, match="keeps running"):
        manager.freeze(OWNER, record.id)
    monkeypatch.setattr(engine, "freeze", lambda *a, **k: (_ for _ in ()).throw(EngineError("QMP went away")))
    with pytest.raises(ServiceError) as refused:
        manager.freeze(OWNER, record.id)
    assert refused.value.status == 500
    assert manager.registry.get(record.id).state == RUNNING and run(manager, record.id, "x") == "41"
