"""Named snapshots for real: the SDK and HTTP against `appliance serve` (gunicorn, 2 workers, the pool keeper) and
real microVMs under TCG. One service for the module. Sandboxes made from a snapshot hold its state with RNGs of
their own; a deleted snapshot is gone (its memory with its last sandbox); another key cannot see or use one; the
key's frozen share refuses one too many; a busy sandbox is not snapshotted; a failed snapshot changes nothing.

APPLIANCE_TEST_SNAPSHOT_COPIES sets how many sandboxes start from one snapshot (5 here; `make test-snapshots-long`
runs 20).
"""

from __future__ import annotations

import ast
import os
import sqlite3
import threading
from collections.abc import Iterator

import httpx
import pytest

from appliance.client import (
    NotFoundError,
    RateLimitError,
    Sandbox,
    SandboxBusyError,
    ServerError,
    SnapshotExistsError,
)
from tests.live_service import LiveService

pytestmark = pytest.mark.integration

COPIES = int(os.environ.get("APPLIANCE_TEST_SNAPSHOT_COPIES", "5"))
FROZEN_SHARE = 2
SETUP = """
import os, random
x = 41
os.makedirs('/data/work', exist_ok=True)
with open('/data/work/notes.txt', 'w') as f:
    f.write('saved\\n')
"""
STATE = "(x, open('/data/work/notes.txt').read())"
DRAWS = "(random.random(), os.urandom(8).hex())"


@pytest.fixture(scope="module")
def live() -> Iterator[LiveService]:
    service = LiveService(
        workers=2, pool_size=1,
        env_extra={
            "APPLIANCE_GUEST__MEMORY_MIB": "512",
            # a deadline that only catches a hang: 2 cores shared with other suites make a boot take minutes
            "APPLIANCE_ENGINE__BOOT_TIMEOUT_S": "240",
            "APPLIANCE_SERVICE__WARM_CODE": "import json",
            "APPLIANCE_SERVICE__MAX_SANDBOXES_PER_KEY": str(COPIES + 2),
            "APPLIANCE_SERVICE__MAX_SANDBOXES": str(COPIES + 6),
            "APPLIANCE_SERVICE__MAX_FROZEN_PER_KEY": str(FROZEN_SHARE),
        },
    )
    service.start()
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture(autouse=True)
def clean_slate(live: LiveService) -> Iterator[None]:
    """Every test's sandboxes and snapshots (both keys') are deleted after it; then no template but the published
    one may remain."""
    yield
    for key in (live.key, live.other_key):
        with live.client(key) as api:
            for snapshot in api.get("/v1/snapshots").json()["snapshots"]:
                api.delete(f"/v1/snapshots/{snapshot['name']}")
            for sandbox in api.get("/v1/sandboxes").json()["sandboxes"]:
                api.delete(f"/v1/sandboxes/{sandbox['id']}")
    assert templates(live) == [published(live)], "a snapshot's memory outlived it and its sandboxes"


def templates(live: LiveService) -> list[str]:
    return sorted(d.name for d in (live.run_dir / "templates").glob("tpl-*"))


def published(live: LiveService) -> str:
    import json

    return json.loads((live.run_dir / "templates" / "current.json").read_text())["id"]


def sdk(live: LiveService, key: str | None = None, **kwargs) -> Sandbox:
    return Sandbox.create(url=live.url, api_key=key or live.key, request_timeout=120, **kwargs)


def value(sandbox: Sandbox, code: str):
    result = sandbox.run_code(code)
    assert result.error is None, result.error
    return ast.literal_eval(result.text)


def test_sandboxes_made_from_a_snapshot_hold_its_state_with_rngs_of_their_own(live):
    source = sdk(live)
    assert source.run_code(SETUP).error is None
    saved = source.snapshots.create("base")
    assert saved["state"] == "ready" and saved["source_sandbox_id"] == source.id and saved["size_bytes"] > 0
    source.run_code("x = 0")  # the source keeps running, and what it does now is not in the snapshot
    made = [sdk(live, snapshot="base") for _ in range(COPIES)]
    assert {m.info["metadata"]["from_snapshot"] for m in made} == {"base"}
    assert {value(m, STATE) for m in made} == {(41, "saved\n")}
    draws = [value(m, DRAWS) for m in made]
    assert len({d[0] for d in draws}) == COPIES and len({d[1] for d in draws}) == COPIES, draws
    assert value(source, "x") == 0

    before = templates(live)
    source.snapshots.delete("base")
    with pytest.raises(NotFoundError):
        source.snapshots.get("base")
    with pytest.raises(NotFoundError):
        sdk(live, snapshot="base")
    assert source.snapshots.list() == []
    assert value(made[0], "x + 1") == 42  # sandboxes made from it keep running
    assert templates(live) == before  # ...and keep its memory until the last of them is gone
    for m in made:
        m.close()
    assert templates(live) == [published(live)]


def test_another_key_cannot_see_or_use_a_snapshot(live):
    source = sdk(live)
    source.snapshots.create("mine")
    with live.client(live.other_key) as other:
        assert other.get("/v1/snapshots").json() == {"snapshots": []}
        never = other.post("/v1/sandboxes", json={"snapshot": "never-was"})
        theirs = other.post("/v1/sandboxes", json={"snapshot": "mine"})
        assert never.status_code == theirs.status_code == 404
        assert theirs.json()["error"]["message"] == never.json()["error"]["message"].replace("never-was", "mine")
        assert other.get("/v1/snapshots/mine").status_code == 404
        assert other.delete("/v1/snapshots/mine").status_code == 404
    assert [s["name"] for s in source.snapshots.list()] == ["mine"]  # untouched by the other key's delete


def test_the_keys_frozen_share_refuses_one_snapshot_too_many(live):
    source = sdk(live)
    for i in range(FROZEN_SHARE):
        source.snapshots.create(f"s{i}")
    with pytest.raises(SnapshotExistsError):
        source.snapshots.create("s0")
    with pytest.raises(RateLimitError, match="max_frozen_per_key"):
        source.snapshots.create("one-too-many")
    source.snapshots.delete("s0")
    assert source.snapshots.create("one-too-many")["state"] == "ready"


def test_a_busy_sandbox_is_not_snapshotted(live):
    source = sdk(live)
    started, result = threading.Event(), {}

    def slow() -> None:
        with httpx.stream("POST", f"{live.url}/v1/sandboxes/{source.id}/exec", headers={
                **live.headers(), "Accept": "application/x-ndjson"}, json={"code": SLOW}, timeout=120) as response:
            for line in response.iter_lines():
                started.set()
                result["last"] = line

    runner = threading.Thread(target=slow)
    runner.start()
    try:
        assert started.wait(60)
        with pytest.raises(SandboxBusyError):
            source.snapshots.create("busy")
    finally:
        runner.join(120)
    assert '"done"' in result["last"] and "'finished'" in result["last"]  # the exec was not disturbed
    assert source.snapshots.list() == []
    assert source.snapshots.create("after")["state"] == "ready"


SLOW = "import time\nprint('go', flush=True)\ntime.sleep(3)\n'finished'"


def test_a_failed_snapshot_leaves_the_sandbox_as_it_was(live):
    source = sdk(live)
    source.run_code("x = 7")
    # The state is written to <run_dir>/templates/fork-<its VM dir>.ram first: a directory there makes it fail.
    db = sqlite3.connect(live.state_dir / "registry.sqlite3", timeout=30)
    try:
        (vm_dir,) = db.execute("SELECT vm_dir FROM sandboxes WHERE id=?", (source.id,)).fetchone()
    finally:
        db.close()
    blocker = live.run_dir / "templates" / f"fork-{os.path.basename(vm_dir)}.ram"
    blocker.mkdir()
    try:
        before = templates(live)
        with pytest.raises(ServerError, match="keeps running unchanged"):
            source.snapshots.create("doomed")
        assert templates(live) == before and source.snapshots.list() == []
        assert source.refresh()["state"] == "running" and value(source, "x") == 7
    finally:
        blocker.rmdir()
    assert source.snapshots.create("doomed")["state"] == "ready"  # nothing of the failed one is in the way
