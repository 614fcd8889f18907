"""The service's rules for real: `appliance serve` (gunicorn, 2 workers, the pool keeper), real microVMs, the API and
the installed `appliance sandboxes` command, as an operator on the node runs it.

One service for the module, with small limits (2 running sandboxes per key, 3 on the host), small guests, no warm-up
code, and its own view of /proc/meminfo (a file the test writes: a host short of memory without exhausting this
one), and room for only ON_HOST + POOL vCPUs. After every test all sandboxes of both keys are deleted and nothing of
them may remain.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.test_api_live import assert_error
from tests.integration.test_fork_freeze_live import vm_dir, vm_pids
from tests.live_service import LiveService

pytestmark = pytest.mark.integration

PER_KEY, ON_HOST = 2, 3
POOL = 1
# vCPUs the host may commit: exactly what the sandbox limit and the pool need with 1-vCPU guests (the ratio is set from
# this machine's CPU count), so only a bigger guest can pass it.
VCPUS = ON_HOST + POOL
HANG_S = 60.0  # deadlines only catch hangs
# Runs until it is interrupted, printing all along (a server learns that its client left when a write fails), and
# records how it ended in the namespace.
UNTIL_INTERRUPTED = """
import time
how = 'running'
ticks = 0
try:
    while True:
        ticks += 1
        print('tick', ticks, flush=True)
        time.sleep(0.05)
except KeyboardInterrupt:
    how = 'interrupted'
    raise
"""
NEVER_TIMES_OUT = 3600.0  # what stops UNTIL_INTERRUPTED in these tests is the interrupt, not the exec's timeout


@pytest.fixture(scope="module")
def meminfo(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("host") / "meminfo"
    path.write_text(Path("/proc/meminfo").read_text())
    return path


@pytest.fixture(scope="module")
def live(meminfo: Path) -> Iterator[LiveService]:
    service = LiveService(
        workers=2, pool_size=POOL, meminfo=meminfo,
        env_extra={
            "APPLIANCE_SERVICE__VCPU_OVERCOMMIT": repr(VCPUS / (os.cpu_count() or 1)),
            "APPLIANCE_GUEST__MEMORY_MIB": "256",
            "APPLIANCE_SERVICE__WARM_CODE": "",
            "APPLIANCE_SERVICE__MAX_SANDBOXES_PER_KEY": str(PER_KEY),
            "APPLIANCE_SERVICE__MAX_SANDBOXES": str(ON_HOST),
        },
    )
    service.start()
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture
def api(live: LiveService) -> Iterator[httpx.Client]:
    with live.client() as client:
        yield client


@pytest.fixture
def other(live: LiveService) -> Iterator[httpx.Client]:
    """The API as the second key."""
    with live.client(live.other_key) as client:
        yield client


@pytest.fixture(autouse=True)
def clean_slate(live: LiveService) -> Iterator[None]:
    """Every sandbox of both keys is deleted after each test; then no VM but the pooled one, no snapshot is left."""
    yield
    for key in (live.key, live.other_key):
        with live.client(key) as client:
            for sandbox in client.get("/v1/sandboxes").json()["sandboxes"]:
                client.delete(f"/v1/sandboxes/{sandbox['id']}")
    deadline = time.monotonic() + HANG_S
    while not (live.pooled() == live.pool_size and len(vm_pids(live.run_dir)) == live.pool_size):
        assert time.monotonic() < deadline, "a sandbox's QEMU outlived it, or the pool did not refill"
        time.sleep(0.2)
    assert [p.name for p in (live.state_dir / "snapshots").glob("*") if p.is_dir()] == []


def create(client: httpx.Client, **body) -> str:
    response = client.post("/v1/sandboxes", json=body)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def execute(client: httpx.Client, sandbox_id: str, code: str) -> dict:
    response = client.post(f"/v1/sandboxes/{sandbox_id}/exec", json={"code": code})
    assert response.status_code == 200, response.text
    assert response.json()["error"] is None, response.json()["error"]
    return response.json()


def state(client: httpx.Client, sandbox_id: str) -> str:
    response = client.get(f"/v1/sandboxes/{sandbox_id}")
    assert response.status_code == 200, response.text
    return response.json()["state"]


def qemus_of(live: LiveService, sandbox_id: str) -> list[int]:
    """The QEMUs of a sandbox, in whichever of its VM directories (a resumed one gets a new one)."""
    return [pid for directory in (live.run_dir / "sandboxes").glob(f"vm-{sandbox_id}*") for pid in vm_pids(directory)]


def snapshot_files(live: LiveService, sandbox_id: str) -> dict[str, int]:
    """Each file of a frozen sandbox's snapshot with its modification time: a second freeze must not write them."""
    root = live.state_dir / "snapshots" / sandbox_id
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


def cli_ok(live: LiveService, *argv: str, key: str | None = None) -> str:
    done = live.cli("sandboxes", *argv, key=key)
    assert done.returncode == 0, done.stderr
    return done.stdout


def cli_refused(live: LiveService, *argv: str, key: str | None = None) -> str:
    """The one line of a failed `appliance sandboxes` command (exit 1, no traceback)."""
    done = live.cli("sandboxes", *argv, key=key)
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert len(done.stderr.splitlines()) == 1 and "Traceback" not in done.stderr, done.stderr
    return done.stderr


def on_another_worker(live: LiveService, worker: str) -> httpx.Client:
    """A client whose kept-alive connection an API worker other than `worker` serves."""
    for _ in range(40):
        client = live.client(timeout=HANG_S)
        if client.get("/v1/healthz").headers["X-Appliance-Worker"] != worker:
            return client
        client.close()
    pytest.fail(f"every connection landed on worker {worker}")


def set_mem_available(meminfo: Path, kib: int) -> None:
    """What the service reads as the host's available memory (written in place: the file is bind-mounted)."""
    lines = [f"MemAvailable:   {kib} kB" if line.startswith("MemAvailable:") else line
             for line in Path("/proc/meminfo").read_text().splitlines()]
    with open(meminfo, "w") as handle:
        handle.write("\n".join(lines) + "\n")


def until_done(lines: Iterator[str]) -> dict:
    """The `done` event of a streamed exec. Code that goes on printing keeps every read short, so only this deadline
    stops a wait for code that was never interrupted."""
    deadline = time.monotonic() + HANG_S
    for line in lines:
        event = json.loads(line)
        if event["type"] == "done":
            return event
        assert time.monotonic() < deadline, "the code still runs"
    pytest.fail("the stream ended without a done event")


# ---- limits -------------------------------------------------------------------------------------------------------


def test_the_host_limit_counts_every_keys_sandboxes(live, api, other):
    mine = [create(api) for _ in range(PER_KEY)]
    theirs = create(other)
    # The other key holds 1 of its 2, but the host runs 3 of its 3: refused, for the host's reason.
    for refused in (other.post("/v1/sandboxes"), other.post(f"/v1/sandboxes/{theirs}/fork", json={"n": 1})):
        message = assert_error(refused, 429, "limit_reached")["message"]
        assert "service.max_sandboxes)" in message and "per_key" not in message
        assert int(refused.headers["Retry-After"]) > 0
    assert [s["id"] for s in other.get("/v1/sandboxes").json()["sandboxes"]] == [theirs]
    assert api.delete(f"/v1/sandboxes/{mine[0]}").status_code == 204
    assert create(other)  # a place on the host is free again, whichever key freed it


def test_resume_or_exec_of_a_frozen_sandbox_at_the_keys_limit_is_429_and_it_stays_frozen(live, api):
    frozen = create(api)
    execute(api, frozen, "kept = 'cold'")
    assert api.post(f"/v1/sandboxes/{frozen}/freeze").json()["state"] == "frozen"
    running = [create(api) for _ in range(PER_KEY)]  # the key's limit, reached while it sleeps
    for refused in (api.post(f"/v1/sandboxes/{frozen}/resume"),
                    api.post(f"/v1/sandboxes/{frozen}/exec", json={"code": "kept"})):
        assert "max_sandboxes_per_key" in assert_error(refused, 429, "limit_reached")["message"]
        assert int(refused.headers["Retry-After"]) > 0
    assert "max_sandboxes_per_key" in cli_refused(live, "resume", frozen)
    assert state(api, frozen) == "frozen" and qemus_of(live, frozen) == [] and snapshot_files(live, frozen)

    assert cli_ok(live, "rm", running[0]) == f"{running[0]} deleted\n"
    assert_error(api.get(f"/v1/sandboxes/{running[0]}"), 404, "not_found")
    assert execute(api, frozen, "kept")["text"] == "'cold'"  # with room again, the call resumes it
    assert state(api, frozen) == "running"


# ---- memory -------------------------------------------------------------------------------------------------------


def test_a_fork_that_does_not_fit_host_memory_is_507_and_the_source_is_unchanged(live, api, meminfo):
    source = create(api)
    execute(api, source, "x = [1, 2, 3]")
    templates = sorted(p.name for p in (live.run_dir / "templates").iterdir())
    qemus = sorted(vm_pids(live.run_dir))
    set_mem_available(meminfo, 32 << 10)  # a copy of a 256 MiB guest is counted as 64 MiB
    try:
        refused = api.post(f"/v1/sandboxes/{source}/fork", json={"n": 1})
    finally:
        meminfo.write_text(Path("/proc/meminfo").read_text())
    assert "host memory" in assert_error(refused, 507, "insufficient_capacity")["message"]
    assert [s["id"] for s in api.get("/v1/sandboxes").json()["sandboxes"]] == [source]
    assert sorted(p.name for p in (live.run_dir / "templates").iterdir()) == templates
    assert sorted(vm_pids(live.run_dir)) == qemus
    assert state(api, source) == "running"
    assert execute(api, source, "x.append(4); x")["text"] == "[1, 2, 3, 4]"
    forked = api.post(f"/v1/sandboxes/{source}/fork", json={"n": 1})  # with the memory there, the same fork works
    assert forked.status_code == 201, forked.text


def test_a_create_that_does_not_fit_the_hosts_vcpus_is_507_naming_vcpus(live, api):
    deadline = time.monotonic() + HANG_S
    while live.pooled() < live.pool_size:
        assert time.monotonic() < deadline, "the pool did not fill"
        time.sleep(0.2)
    refused = api.post("/v1/sandboxes", json={"vcpus": VCPUS})  # with the pooled clone's vCPU: one too many
    message = assert_error(refused, 507, "insufficient_capacity")["message"]
    assert "vCPUs" in message and "service.vcpu_overcommit" in message and "memory" not in message
    assert api.get("/v1/sandboxes").json()["sandboxes"] == []
    assert len(vm_pids(live.run_dir)) == live.pool_size  # nothing was booted for it


# ---- lost sandboxes -----------------------------------------------------------------------------------------------


def test_freeze_and_fork_of_a_lost_sandbox_are_410(live, api):
    victim = create(api)
    execute(api, victim, "x = 1")  # a worker holds a connection to it now
    os.kill(int((vm_dir(live, victim) / "qemu.pid").read_text()), signal.SIGKILL)
    deadline = time.monotonic() + HANG_S
    while qemus_of(live, victim):
        assert time.monotonic() < deadline, "the killed QEMU did not go"
        time.sleep(0.01)
    # As soon as it is gone, mostly before the pool keeper's next look (every 2 s): the request finds out by itself.
    assert_error(api.post(f"/v1/sandboxes/{victim}/freeze"), 410, "sandbox_lost")
    assert_error(api.post(f"/v1/sandboxes/{victim}/fork", json={"n": 1}), 410, "sandbox_lost")
    assert state(api, victim) == "lost"
    assert "lost" in cli_refused(live, "freeze", victim)
    assert_error(api.post(f"/v1/sandboxes/{victim}/exec", json={"code": "x"}), 410, "sandbox_lost")
    assert_error(api.post(f"/v1/sandboxes/{victim}/fork", json={"n": 1}), 410, "sandbox_lost")
    assert victim in cli_ok(live, "list", "--state", "lost")
    assert [s["id"] for s in api.get("/v1/sandboxes").json()["sandboxes"]] == [victim]  # no fork was made
    assert cli_ok(live, "rm", victim) == f"{victim} deleted\n"
    assert_error(api.get(f"/v1/sandboxes/{victim}"), 404, "not_found")


# ---- freeze, resume, fork -----------------------------------------------------------------------------------------


def test_repeated_freeze_and_resume_are_no_ops_and_a_frozen_sandbox_forks(live, api):
    sandbox = create(api)
    execute(api, sandbox, "x = 41")
    assert cli_ok(live, "freeze", sandbox) == f"{sandbox} frozen\n"
    written = snapshot_files(live, sandbox)
    assert written and qemus_of(live, sandbox) == []
    assert cli_ok(live, "freeze", sandbox) == f"{sandbox} frozen\n"  # again: nothing to do
    again = api.post(f"/v1/sandboxes/{sandbox}/freeze")
    assert again.status_code == 200 and again.json()["state"] == "frozen"
    assert snapshot_files(live, sandbox) == written and qemus_of(live, sandbox) == []

    forked = api.post(f"/v1/sandboxes/{sandbox}/fork", json={"n": 1})  # resumes it, then forks
    assert forked.status_code == 201, forked.text
    (kid,) = forked.json()["sandboxes"]
    assert kid["metadata"]["forked_from"] == sandbox
    assert execute(api, kid["id"], "x + 1")["text"] == "42"
    assert state(api, sandbox) == "running"
    vm = qemus_of(live, sandbox)
    assert len(vm) == 1
    for resumed in (api.post(f"/v1/sandboxes/{sandbox}/resume"), api.post(f"/v1/sandboxes/{sandbox}/resume")):
        assert resumed.status_code == 200 and resumed.json()["state"] == "running"  # already: nothing to do
    assert cli_ok(live, "resume", sandbox) == f"{sandbox} running\n"
    assert qemus_of(live, sandbox) == vm and execute(api, sandbox, "x")["text"] == "41"

    # The fork is over: another API worker can freeze it (QEMU serves one monitor client at a time).
    elsewhere = on_another_worker(live, forked.headers["X-Appliance-Worker"])
    try:
        frozen = elsewhere.post(f"/v1/sandboxes/{sandbox}/freeze")
    finally:
        elsewhere.close()
    assert frozen.status_code == 200 and frozen.json()["state"] == "frozen", frozen.text
    assert cli_ok(live, "rm", sandbox) == f"{sandbox} deleted\n"  # a frozen one: its snapshot goes too
    assert not (live.state_dir / "snapshots" / sandbox).exists()
    assert_error(api.get(f"/v1/sandboxes/{sandbox}"), 404, "not_found")


def test_another_keys_fork_freeze_and_resume_are_404_and_change_nothing(live, api, other):
    running = create(api)
    execute(api, running, "x = 'mine'")
    frozen = create(api)
    execute(api, frozen, "x = 'mine too'")
    api.post(f"/v1/sandboxes/{frozen}/freeze")
    written = snapshot_files(live, frozen)
    for sandbox_id in (running, frozen):
        for action in ("fork", "freeze", "resume"):
            assert_error(other.post(f"/v1/sandboxes/{sandbox_id}/{action}", json={}), 404, "not_found")
        for command in ("freeze", "resume", "rm"):
            assert "no sandbox" in cli_refused(live, command, sandbox_id, key=live.other_key)
    assert other.get("/v1/sandboxes").json() == {"sandboxes": []}
    assert [s["id"] for s in api.get("/v1/sandboxes").json()["sandboxes"]] == [running, frozen]
    assert state(api, frozen) == "frozen" and snapshot_files(live, frozen) == written
    assert qemus_of(live, frozen) == []
    assert execute(api, running, "x")["text"] == "'mine'"


# ---- idle sandboxes -----------------------------------------------------------------------------------------------


def test_an_idle_sandbox_is_closed_and_the_others_are_not(live, api):
    idle = create(api, timeout_s=2)
    kept = create(api)  # the default idle lifetime (15 minutes)
    execute(api, idle, "x = 1")
    deadline = time.monotonic() + HANG_S
    while api.get(f"/v1/sandboxes/{idle}").status_code != 404:
        assert time.monotonic() < deadline, "the pool keeper did not close the idle sandbox"
        time.sleep(0.5)
    assert qemus_of(live, idle) == []
    assert not (live.state_dir / "snapshots" / idle).exists()  # closed, not frozen
    assert [s["id"] for s in api.get("/v1/sandboxes").json()["sandboxes"]] == [kept]
    assert_error(api.post(f"/v1/sandboxes/{idle}/exec", json={"code": "x"}), 404, "not_found")


# ---- interrupt ----------------------------------------------------------------------------------------------------


def test_interrupt_stops_the_running_code_and_keeps_the_namespace(live, api):
    sandbox = create(api)
    execute(api, sandbox, "kept = 'here'")
    with live.client(timeout=HANG_S) as runner, runner.stream(
        "POST", f"/v1/sandboxes/{sandbox}/exec", json={"code": UNTIL_INTERRUPTED, "timeout_s": NEVER_TIMES_OUT},
        headers={"Accept": "application/x-ndjson"},
    ) as running:
        lines = running.iter_lines()
        assert json.loads(next(lines))["type"] == "stdout"  # the code runs now
        interrupted = api.post(f"/v1/sandboxes/{sandbox}/interrupt")
        assert interrupted.status_code == 202 and interrupted.json() == {"id": sandbox, "interrupted": True}
        done = until_done(lines)
    assert done["type"] == "done" and done["error"]["name"] == "KeyboardInterrupt"
    assert done["sandbox_lost"] is False and done["worker_restarted"] is False
    assert execute(api, sandbox, "(kept, how)")["text"] == "('here', 'interrupted')"


def test_a_client_that_leaves_mid_exec_interrupts_the_code_and_keeps_the_namespace(live, api):
    sandbox = create(api)
    execute(api, sandbox, "kept = 'here'")
    with live.client(timeout=HANG_S) as runner, runner.stream(
        "POST", f"/v1/sandboxes/{sandbox}/exec", json={"code": UNTIL_INTERRUPTED, "timeout_s": NEVER_TIMES_OUT},
        headers={"Accept": "application/x-ndjson"},
    ) as running:
        assert json.loads(next(running.iter_lines()))["type"] == "stdout"
    # The connection is closed: the server's next write fails, and it interrupts the code it was running for nobody.
    deadline = time.monotonic() + HANG_S
    while (after := api.post(f"/v1/sandboxes/{sandbox}/exec", json={"code": "(kept, how)"})).status_code == 409:
        assert time.monotonic() < deadline, "the code still runs after its client left"
        time.sleep(0.2)
    assert after.status_code == 200, after.text
    assert after.json()["text"] == "('here', 'interrupted')" and after.json()["worker_restarted"] is False
