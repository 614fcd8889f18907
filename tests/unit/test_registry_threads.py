"""The registry under an API worker's threads: concurrent claims never fail and never hand out a clone twice."""

from __future__ import annotations

import threading

from service.registry import POOLED, Registry, SandboxRecord


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
