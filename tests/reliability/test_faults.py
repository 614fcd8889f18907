"""Faults, on purpose: each case builds a running sandbox (x = 41), a frozen one (x = 41) and a third running an exec
(started, printing x at the end), then does one bad thing to the live service, and checks what an operator would:

- the API answers again (readyz 200, the listing 200);
- the running sandbox answers x == 41, or is reported `lost` (410); never a fresh namespace (a silent reset);
- the frozen one resumes with x == 41;
- the exec in flight ended (no hang): with its output, or an error; its sandbox is then as the running one;
- after deleting the three, nothing is left (leaks.Inventory): no QEMU, VM dir, socket, cgroup, namespace, tap or
  snapshot nobody owns, and the counts are back where the module started; exactly one master, its workers and one
  pool keeper run (nothing of an earlier service outlives it).

It kills only what the test started: the service's master (its Popen), processes found as its children, and QEMUs
whose command line holds the service's run dir. `make test` runs the short matrix; `make chaos` (APPLIANCE_CHAOS=full)
adds the slower cases (a simulated host reboot re-warms the template: minutes under TCG). A clock jump is tested with
an injected clock against the real pool keeper in tests/unit/test_pool_clock.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from service.engine.netpolicy import NETNS_PREFIX
from tests.live_service import LiveService
from tests.reliability.conftest import delete_all
from tests.reliability.leaks import Inventory, Snapshot, service_pids
from tests.vmtools import qemu_pids_under

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]  # a case re-warming the template takes minutes

HANG_S = 600  # a deadline that only catches hangs: a loaded 2-core host is slow, never this slow
IN_FLIGHT_CODE = "import time\nprint('started', flush=True)\ntime.sleep(12)\nprint(x)"
FULL = os.environ.get("APPLIANCE_CHAOS") == "full"
SNAPSHOT_DISK_MIB = 2048  # the small state disk of the disk_full case: two frozen 1 GiB guests' worth of RAM in use
# `make test`: about 4 minutes here. The rest run in `make chaos` (registry_locked waits out SQLite's 30 s on purpose;
# reboot re-warms the template; an orderly restart is also in tests/integration/test_api_live.py).
SHORT_CASES = ["worker", "master", "qemu", "disk_full"]
FULL_CASES = ["keeper", "restart", "registry_locked", "reboot"]


# ---- the three sandboxes ---------------------------------------------------------------------------------------

@dataclass
class InFlight:
    """An exec streaming in a thread of its own: `started` is set when its first line arrived."""

    thread: threading.Thread | None = None
    started: threading.Event = field(default_factory=threading.Event)
    events: list[dict] = field(default_factory=list)
    status: int | None = None
    error: str | None = None


@dataclass
class Trio:
    running: str
    frozen: str
    busy: str
    in_flight: InFlight


def _exec(api: httpx.Client, sandbox_id: str, code: str) -> httpx.Response:
    return api.post(f"/v1/sandboxes/{sandbox_id}/exec", json={"code": code}, timeout=HANG_S)


def _create(api: httpx.Client) -> str:
    response = _retrying(lambda: api.post("/v1/sandboxes", json={"timeout_s": 3600}, timeout=HANG_S))
    assert response.status_code == 201, response.text
    sandbox_id = response.json()["id"]
    assert _exec(api, sandbox_id, "x = 41").status_code == 200
    return sandbox_id


def _retrying(call: Callable[[], httpx.Response]) -> httpx.Response:
    """The call, again while it is refused with a documented 'later' (409, 429, 503 with Retry-After)."""
    deadline = time.monotonic() + HANG_S
    while True:
        response = call()
        if response.status_code not in (409, 429, 503) or time.monotonic() > deadline:
            return response
        time.sleep(min(float(response.headers.get("Retry-After", "1")), 5.0))


def _stream(live: LiveService, sandbox_id: str, flight: InFlight) -> None:
    try:
        with httpx.Client(base_url=live.url, headers=live.headers(), timeout=HANG_S) as api, api.stream(
                "POST", f"/v1/sandboxes/{sandbox_id}/exec", json={"code": IN_FLIGHT_CODE},
                headers={"Accept": "application/x-ndjson"}) as response:
            flight.status = response.status_code
            for line in response.iter_lines():
                flight.events.append(json.loads(line))
                flight.started.set()
    except (httpx.TransportError, ValueError) as exc:  # the worker carrying it died: an error, not a hang
        flight.error = f"{type(exc).__name__}: {exc}"
    finally:
        flight.started.set()


def make_trio(live: LiveService) -> Trio:
    with live.client() as api:
        running, frozen, busy = (_create(api) for _ in range(3))
        response = _retrying(lambda: api.post(f"/v1/sandboxes/{frozen}/freeze", timeout=HANG_S))
        assert response.status_code == 200 and response.json()["state"] == "frozen", response.text
    flight = InFlight()
    flight.thread = threading.Thread(target=_stream, args=(live, busy, flight), daemon=True)
    flight.thread.start()
    assert flight.started.wait(HANG_S), "the exec never started"
    assert flight.events and flight.events[0] == {"type": "stdout", "data": "started\n"}, (flight.events, flight.error)
    return Trio(running, frozen, busy, flight)


# ---- what must hold after every fault --------------------------------------------------------------------------

def wait_answering(live: LiveService) -> None:
    deadline = time.monotonic() + HANG_S
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{live.url}/v1/readyz", timeout=30).status_code == 200:
                with live.client() as api:
                    assert api.get("/v1/sandboxes").status_code == 200
                return
        time.sleep(0.5)
    raise AssertionError(f"the API did not answer again:\n{live.log_tail()}")


def check_kept_or_lost(api: httpx.Client, sandbox_id: str) -> str:
    """x == 41 (it kept its state) or 410 (reported lost); anything else fails. Returns 'kept' or 'lost'."""
    shown = api.get(f"/v1/sandboxes/{sandbox_id}")
    assert shown.status_code == 200, shown.text
    answer = _retrying(lambda: _exec(api, sandbox_id, "print(x)"))
    if answer.status_code == 410:
        assert answer.json()["error"]["code"] == "sandbox_lost"
        assert api.get(f"/v1/sandboxes/{sandbox_id}").json()["state"] == "lost"
        return "lost"
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert result.get("error") is None and result["stdout"] == "41\n", f"{sandbox_id} was reset: {result}"
    return "kept"


def check_after(live: LiveService, trio: Trio, may_lose: tuple[str, ...] = ()) -> dict[str, str]:
    """The checks every case ends with; `may_lose` names the sandboxes the fault may make lost (running, busy)."""
    wait_answering(live)
    flight = trio.in_flight
    assert flight.thread is not None
    flight.thread.join(HANG_S)
    assert not flight.thread.is_alive(), "the exec in flight hung"
    outcome: dict[str, str] = {}
    done = [event for event in flight.events if event.get("type") == "done"]
    if done and done[-1].get("error") is None:
        assert done[-1]["stdout"] == "started\n41\n", done[-1]
        outcome["exec in flight"] = "answered"
    else:
        outcome["exec in flight"] = "error: " + (flight.error or json.dumps(done[-1].get("error") if done else None))
    with live.client() as api:
        for name, sandbox_id in (("running", trio.running), ("busy", trio.busy)):
            outcome[name] = check_kept_or_lost(api, sandbox_id)
            assert outcome[name] == "kept" or name in may_lose, f"{name} sandbox lost: {outcome}"
        resumed = _retrying(lambda: api.post(f"/v1/sandboxes/{trio.frozen}/resume", timeout=HANG_S))
        assert resumed.status_code == 200 and resumed.json()["state"] == "running", resumed.text
        outcome["frozen"] = check_kept_or_lost(api, trio.frozen)
        assert outcome["frozen"] == "kept", "a frozen sandbox was lost"
    return outcome


def check_no_leaks(live: LiveService, inventory: Inventory, baseline: Snapshot) -> Snapshot:
    """After deleting every sandbox: no orphan, and the host resources as at the start (the pool refilled)."""
    delete_all(live)
    deadline = time.monotonic() + HANG_S
    while True:
        now = inventory.take()
        processes = _service_shape(live)
        if not now.orphans and now.resources() == baseline.resources() and processes is None:
            return now
        if time.monotonic() > deadline:
            raise AssertionError(f"left behind: {now.orphans}, {processes}; resources {now.resources()} "
                                 f"were {baseline.resources()}")
        time.sleep(0.5)


def _service_shape(live: LiveService) -> str | None:
    """None when exactly the master, its workers and one keeper run (and no process of an older service)."""
    if len(live.worker_pids()) != live.workers or len(live.keeper_pids()) != 1:
        return f"workers {live.worker_pids()}, keepers {live.keeper_pids()}"
    strays = [pid for pid, started in _old_service_pids if _alive(pid) and _start_time(pid) == started
              and pid not in service_pids(live)]
    return f"processes of an earlier service still run: {strays}" if strays else None


# every service process this module has seen, with its start time (PIDs get reused): a master kill must end them all
_old_service_pids: set[tuple[int, str]] = set()


def _remember(live: LiveService) -> None:
    _old_service_pids.update((pid, _start_time(pid)) for pid in service_pids(live))


def _start_time(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait(condition: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + HANG_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


# ---- the faults ------------------------------------------------------------------------------------------------

def kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def fault_worker(live: LiveService, trio: Trio) -> tuple[str, ...]:
    """kill -9 every gunicorn worker (so the one carrying the exec is among them); the master starts new ones."""
    old = live.worker_pids()
    for pid in old:
        kill(pid)
    _wait(lambda: len(set(live.worker_pids()) - set(old)) == live.workers, "new workers")
    return ()


def fault_keeper(live: LiveService, trio: Trio) -> tuple[str, ...]:
    """kill -9 the pool keeper, while it makes a pooled clone if the test can catch it doing so (a create takes
    the pooled one first): a clone started and never registered must not stay behind."""
    (old,) = live.keeper_pids()
    with live.client() as api:
        taken = _create(api)  # the pool is empty now: the keeper clones
    inventory = Inventory(live, "")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any("VM dir" in orphan for orphan in inventory.take().orphans):
        time.sleep(0.05)
    kill(old)
    _wait(lambda: live.keeper_pids() and live.keeper_pids() != [old], "a new pool keeper")
    with live.client() as api:
        api.delete(f"/v1/sandboxes/{taken}")
    return ()


def fault_qemu(live: LiveService, trio: Trio) -> tuple[str, ...]:
    """kill -9 the QEMU of the sandbox running the exec: that exec ends with an error, the sandbox is lost."""
    pid = int((live.run_dir / "sandboxes" / f"vm-{trio.busy}" / "qemu.pid").read_text())
    assert pid in qemu_pids_under(live.run_dir)
    kill(pid)
    return ("busy",)


def fault_master(live: LiveService, trio: Trio) -> tuple[str, ...]:
    """kill -9 the gunicorn master: its workers and its keeper must go too (nothing of it may serve or reap on),
    and a new `appliance serve` takes over the sandboxes."""
    _remember(live)
    below = [pid for pid in service_pids(live) if pid != live.master_pid]
    kill(live.master_pid)
    live.process.wait(timeout=HANG_S)
    _wait(lambda: not any(_alive(pid) for pid in below), f"the dead master's workers and keeper {below} to exit")
    live.restart()
    return ()


def fault_restart(live: LiveService, trio: Trio) -> tuple[str, ...]:
    """An orderly restart (SIGTERM, then a new `appliance serve` on the same dirs) with the exec in flight."""
    _remember(live)
    live.restart()
    return ()


def fault_reboot(live: LiveService, trio: Trio) -> tuple[str, ...]:
    """A host reboot, simulated: every process of the service and every QEMU it ran killed, the tmpfs run dir wiped,
    and what the kernel forgets at a reboot (the service's network namespaces, its cgroups) gone; then the service
    starts again on the same state dir. Running sandboxes are lost; frozen ones are on disk."""
    _remember(live)
    inventory = Inventory(live, live.env["APPLIANCE_ISOLATION__CGROUP_NAME"])
    before = inventory.take()
    for pid in service_pids(live):
        kill(pid)
    live.process.wait(timeout=HANG_S)
    for pid in qemu_pids_under(live.run_dir):
        kill(pid)
    _wait(lambda: not qemu_pids_under(live.run_dir), "the QEMUs to die")
    for slot in inventory.slots_seen:
        subprocess.run(["ip", "netns", "delete", f"{NETNS_PREFIX}{slot}"], capture_output=True)
    def cgroups_gone() -> bool:  # a cgroup empties a moment after its last process is reaped: until then EBUSY
        for cgroup in inventory.cgroup_dirs():
            with contextlib.suppress(OSError):
                cgroup.rmdir()
        return not inventory.cgroup_dirs()

    _wait(cgroups_gone, "the killed VMs' cgroups to go (a reboot clears them)")
    for entry in live.run_dir.iterdir():
        subprocess.run(["rm", "-rf", "--one-file-system", str(entry)], check=True)
    assert before.qemus > 0
    live.restart()
    return ("running", "busy")


def fault_registry_locked(live: LiveService, trio: Trio) -> tuple[str, ...]:
    """Another process holds the registry's write lock longer than the service waits for it (30 s): every call
    meanwhile answers 2xx or a documented 503 with Retry-After, never 500; after the lock goes, all works."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sqlite3, sys, time\n"
         "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
         "db.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); sys.stdin.readline()",
         str(live.state_dir / "registry.sqlite3")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        answers = []
        with live.client() as api:
            answers.append(("create", api.post("/v1/sandboxes", timeout=HANG_S)))
            answers.append(("list", api.get("/v1/sandboxes")))
            answers.append(("delete", api.delete(f"/v1/sandboxes/{trio.running}-none")))
        for name, response in answers:
            assert response.status_code < 500 or (
                response.status_code == 503 and "Retry-After" in response.headers
                and response.json()["error"]["code"] == "node_unavailable"), f"{name}: {response.text}"
            if name == "create" and response.status_code == 201:
                with live.client() as api:
                    api.delete(f"/v1/sandboxes/{response.json()['id']}")
    finally:
        holder.stdin.close()
        holder.wait(timeout=HANG_S)
    return ()


@contextlib.contextmanager
def small_snapshot_disk(live: LiveService, size_mib: int) -> Iterator[Path]:
    """The state dir's snapshots on a tmpfs of `size_mib` (a small disk of its own), unmounted at the end."""
    snapshots = live.state_dir / "snapshots"
    snapshots.mkdir(mode=0o700, parents=True, exist_ok=True)
    assert not any(entry.is_dir() for entry in snapshots.iterdir()), "snapshots would be hidden under the mount"
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0700", "appliance-chaos", str(snapshots)],
                   check=True)
    try:
        yield snapshots
    finally:
        subprocess.run(["umount", "--lazy", str(snapshots)], check=False)


def fault_disk_full(live: LiveService, trio: Trio) -> tuple[str, ...]:
    """The state disk fills up while a freeze writes: the moment the freeze starts (its partial snapshot dir
    appears; its free-disk check has passed), the small disk is shrunk to what it holds (a tmpfs remount: instant,
    where a filler file races the freeze and loses). The freeze is refused with a documented 507, the sandbox keeps
    running with its state, no partial snapshot stays, and once there is room it freezes and resumes."""
    snapshots = live.state_dir / "snapshots"
    partial = snapshots / f"{trio.running}.partial"  # snapshot.freeze writes there, then renames
    full_at: list[int] = []

    def shrink_when_written() -> None:
        deadline = time.monotonic() + HANG_S
        while not partial.exists() and time.monotonic() < deadline:
            time.sleep(0.0005)
        stat = os.statvfs(snapshots)
        used_mib = ((stat.f_blocks - stat.f_bfree) * stat.f_frsize >> 20) + 1
        subprocess.run(["mount", "-o", f"remount,size={used_mib}m", str(snapshots)], check=True)
        full_at.append(used_mib)

    shrinking = threading.Thread(target=shrink_when_written, daemon=True)
    shrinking.start()
    with live.client() as api:
        frozen = api.post(f"/v1/sandboxes/{trio.running}/freeze", timeout=HANG_S)
        shrinking.join(HANG_S)
        assert full_at, "the disk was never made full"
        assert frozen.status_code == 507 and frozen.json()["error"]["code"] == "insufficient_storage", frozen.text
        assert "keeps running" in frozen.json()["error"]["message"]
        assert not partial.exists() and not (snapshots / trio.running).exists(), "a partial snapshot stayed"
        subprocess.run(["mount", "-o", f"remount,size={SNAPSHOT_DISK_MIB}m", str(snapshots)], check=True)
        assert check_kept_or_lost(api, trio.running) == "kept"
        again = api.post(f"/v1/sandboxes/{trio.running}/freeze", timeout=HANG_S)
        assert again.status_code == 200, again.text
    return ()


FAULTS = {name: globals()[f"fault_{name}"] for name in SHORT_CASES + FULL_CASES}


# ---- the matrix ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def inventory(live):
    delete_all(live)
    live.wait_pool_full(time.monotonic() + HANG_S)
    inventory = Inventory(live, live.env["APPLIANCE_ISOLATION__CGROUP_NAME"])
    baseline = inventory.take()
    assert not baseline.orphans, baseline.orphans
    yield inventory, baseline
    delete_all(live)


RESULTS: dict[str, dict[str, str]] = {}


@pytest.mark.parametrize("case", SHORT_CASES + [pytest.param(name, marks=pytest.mark.skipif(
    not FULL, reason="make chaos runs it (APPLIANCE_CHAOS=full)")) for name in FULL_CASES])
def test_fault(case, live, inventory):
    inventory_, baseline = inventory
    started = time.monotonic()
    disk = small_snapshot_disk(live, SNAPSHOT_DISK_MIB) if case == "disk_full" else contextlib.nullcontext()
    with disk:
        try:
            trio = make_trio(live)
            may_lose = FAULTS[case](live, trio)
            outcome = check_after(live, trio, may_lose)
        finally:  # (before the small disk goes) a failed case must not leave sandboxes to the next one
            with contextlib.suppress(httpx.HTTPError):
                delete_all(live)
    live.wait_pool_full(time.monotonic() + HANG_S)
    check_no_leaks(live, inventory_, baseline)
    outcome["seconds"] = f"{time.monotonic() - started:.0f}"
    RESULTS[case] = outcome
    print(f"\nfault {case}: {outcome}")
