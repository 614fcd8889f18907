"""The registry under an API worker's threads: concurrent claims never fail and never hand out a clone twice."""

from __future__ import annotations

import threading
from dataclasses import replace

from service.registry import (
    FREEZING,
    FROZEN,
    POOLED,
    RUNNING,
    FrozenRoom,
    Full,
    Limits,
    Registry,
    SandboxRecord,
    SnapshotRecord,
)


def test_concurrent_claims_from_many_threads(tmp_path):
    registry = Registry(tmp_path / "registry.sqlite3")
    for i in range(200):
        registry.add(
            SandboxRecord(
                id=f"sb-{i}", owner=None, state=POOLED, vm_dir="/x", template_id="tpl", machine={}, timeout_s=60
            )
        )
    claimed: list[str] = []
    errors: list[BaseException] = []

    def work() -> None:
        for _ in range(30):
            try:
                record = registry.claim_pooled("owner", "tpl", 60, {})
                if record is not None:
                    claimed.append(record.id)
                registry.touch("sb-0")
                registry.count("owner")
            except BaseException as exc:  # collected: an assertion in a thread would be lost
                errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    registry.close()
    assert errors == []
    assert len(claimed) == len(set(claimed)) == 200


def test_concurrent_resume_admissions_never_pass_the_limit(tmp_path):
    """reserve_resume counts and reserves in one transaction: 8 threads, each with its own connection (as in
    several workers), admit exactly the 3 the key's limit leaves room for; the others stay frozen."""
    path = tmp_path / "registry.sqlite3"
    setup = Registry(path)
    for i in range(8):
        setup.add(SandboxRecord(id=f"sb-{i}", owner="owner", state=FROZEN, vm_dir="", template_id=None,
                                machine={"memory_mib": 256, "vcpus": 1}, timeout_s=60))
    limits = Limits(per_key=3, host=10, memory_mib=None, vcpus=None)
    start = threading.Barrier(8)
    admitted: list[str] = []
    errors: list[BaseException] = []

    def resume(sandbox_id: str) -> None:
        registry = Registry(path)
        start.wait()
        try:
            if registry.reserve_resume(sandbox_id, limits):
                admitted.append(sandbox_id)
        except Full as exc:
            assert exc.what == "per_key"
        except BaseException as exc:  # collected: an assertion in a thread would be lost
            errors.append(exc)
        registry.close()

    threads = [threading.Thread(target=resume, args=(f"sb-{i}",)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == [] and len(admitted) == 3
    assert setup.count("owner") == 3 and setup.counts_by_state()[FROZEN] == 5
    setup.release(admitted)  # a resume that failed: back to frozen, its place given back
    assert setup.count("owner") == 0 and setup.counts_by_state()[FROZEN] == 8
    setup.close()


def _admit_concurrently(path, admit, n: int = 8) -> tuple[list[str], list[str], list[BaseException]]:
    """Run admit(registry, i) for i in range(n) in n threads at once, each with its own connection (as in several
    workers): (admitted, refused with Full: what, unexpected errors)."""
    start = threading.Barrier(n)
    admitted: list[str] = []
    refused: list[str] = []
    errors: list[BaseException] = []

    def work(i: int) -> None:
        registry = Registry(path)
        start.wait()
        try:
            if admit(registry, i):
                admitted.append(f"sb-{i}")
        except Full as exc:
            refused.append(exc.what)
        except BaseException as exc:  # collected: an assertion in a thread would be lost
            errors.append(exc)
        registry.close()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return admitted, refused, errors


def _running(path, n: int = 8) -> Registry:
    setup = Registry(path)
    for i in range(n):
        setup.add(SandboxRecord(id=f"sb-{i}", owner="owner", state=RUNNING, vm_dir="", template_id=None,
                                machine={"memory_mib": 256, "vcpus": 1}, timeout_s=60))
    return setup


ROOMY = FrozenRoom(share=100, free_mib=1 << 20, used_bytes=0, quota_bytes=1 << 50, margin_mib=64)


def test_concurrent_freezes_never_pass_the_keys_frozen_share(tmp_path):
    """reserve_freeze counts the key's frozen state and reserves in one transaction: 8 freezes at once against a
    share of 3 admit exactly 3 (FREEZING); a failed one gives its place back and runs again."""
    path = tmp_path / "registry.sqlite3"
    setup = _running(path)
    room = replace(ROOMY, share=3)
    admitted, refused, errors = _admit_concurrently(path, lambda r, i: r.reserve_freeze(f"sb-{i}", 256, room))
    assert errors == [] and len(admitted) == 3 and refused == ["frozen_share"] * 5
    assert setup.counts_by_state()[FREEZING] == 3 and setup.count("owner") == 8  # their VMs still run
    setup.release(admitted[:1])  # that freeze failed: running again, its share free for the next
    assert setup.get(admitted[0]).state == RUNNING
    assert setup.reserve_freeze(admitted[0], 256, room)
    assert not setup.reserve_freeze(admitted[0], 256, room)  # being frozen already: not admitted twice
    setup.close()


def test_concurrent_freezes_and_snapshots_never_overdraw_free_disk(tmp_path):
    """Each admitted freeze or snapshot promises its guest's memory of the free space measured before it: with
    room for two (256 MiB + 64 MiB margin each), four freezes and four named snapshots at once admit exactly two."""
    path = tmp_path / "registry.sqlite3"
    setup = _running(path)
    room = replace(ROOMY, free_mib=2 * (256 + 64) + 100)

    def admit(registry: Registry, i: int) -> bool:
        if i % 2:
            return registry.reserve_freeze(f"sb-{i}", 256, room)
        registry.reserve_snapshot(SnapshotRecord(owner="owner", name=f"snap-{i}", state="", template_id=None,
                                                 machine={"memory_mib": 256, "vcpus": 1}, source=f"sb-{i}"), room)
        return True

    admitted, refused, errors = _admit_concurrently(path, admit)
    assert errors == [] and len(admitted) == 2 and refused == ["disk"] * 6
    states = setup.counts_by_state()[FREEZING] + len(setup.snapshots("owner"))
    assert states == 2
    setup.close()


def test_concurrent_snapshots_never_pass_the_quota(tmp_path):
    path = tmp_path / "registry.sqlite3"
    setup = _running(path)
    room = replace(ROOMY, used_bytes=100 << 20, quota_bytes=(100 + 3 * 256) << 20)

    def admit(registry: Registry, i: int) -> bool:
        registry.reserve_snapshot(SnapshotRecord(owner=f"key-{i}", name="s", state="", template_id=None,
                                                 machine={"memory_mib": 256, "vcpus": 1}), room)
        return True

    admitted, refused, errors = _admit_concurrently(path, admit)
    assert errors == [] and len(admitted) == 3 and refused == ["quota"] * 5
    setup.close()
