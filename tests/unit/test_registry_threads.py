"""The registry under an API worker's threads: concurrent claims never fail and never hand out a clone twice."""

from __future__ import annotations

import threading

from service.registry import FROZEN, POOLED, Full, Limits, Registry, SandboxRecord


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
