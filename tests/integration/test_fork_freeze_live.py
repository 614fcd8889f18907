"""fork(n), freeze and resume for real: the SDK against `appliance serve` (gunicorn, 2 workers, the pool keeper) and
real microVMs. One service for the module (small guests, light warm-up: this runs under TCG on 2 cores); two tests
restart it, one of them from nothing but the state directory.

After every test all of its sandboxes are deleted and nothing may be left: no template but the published one, no
QEMU but the pooled clones', no snapshot.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from appliance.client import (
    InsufficientStorageError,
    InvalidRequestError,
    NotFoundError,
    RateLimitError,
    Sandbox,
    ServerError,
)
from appliance.commands.sandboxes import sandboxes_group
from tests.live_service import LiveService
from tests.vmtools import kill_qemus_under, qemu_pids_under

pytestmark = pytest.mark.integration

MAX_PER_KEY, MAX_FORK = 6, 8
FROZEN_QUOTA = 2 << 30

# State worth keeping: plain values, a fitted model, numpy data, a file. Files go through code here (the file API
# is checked in test_api_live); what matters is that the guest's filesystem travels with the fork and the freeze.
SETUP = """
import os, random, hashlib
import numpy as np
from sklearn.linear_model import LogisticRegression
x = 41
rng = np.random.default_rng(7)
X = rng.normal(size=(300, 4))
y = (X @ np.array([1.0, -2.0, 0.5, 0.0]) > 0).astype(int)
model = LogisticRegression().fit(X, y)
probe = rng.normal(size=(50, 4))
os.makedirs('/data/work', exist_ok=True)
with open('/data/work/notes.txt', 'w') as f:
    f.write('written before\\n')
"""
# Exact, not approximate: the same bits of the model's output, the same bytes of the file.
STATE = (
    "(x, hashlib.sha256(model.predict_proba(probe).tobytes()).hexdigest(), int(model.predict(probe).sum()), "
    "open('/data/work/notes.txt').read())"
)
DRAWS = "(random.random(), float(np.random.rand()), os.urandom(8).hex())"
# Most of the guest's memory in one array, as a user with a big DataFrame has; the answer is how much was taken.
FILL = (
    "import numpy as np\n"
    "free = {l.split(':')[0]: int(l.split()[1]) for l in open('/proc/meminfo')}['MemAvailable'] << 10\n"
    "big = np.ones(max(free - (96 << 20), 0) // 8)\n"
    "big.nbytes >> 20"
)
SLOW = "import time\nprint('go', flush=True)\ntime.sleep(4)\n'done'"

@pytest.fixture(scope="module")
def live() -> Iterator[LiveService]:
    service = LiveService(
        workers=2, pool_size=1,
        env_extra={
            "APPLIANCE_GUEST__MEMORY_MIB": "512",
            "APPLIANCE_SERVICE__WARM_CODE": "import numpy, sklearn.linear_model",
            "APPLIANCE_SERVICE__MAX_SANDBOXES_PER_KEY": str(MAX_PER_KEY),
            "APPLIANCE_SERVICE__MAX_FORK": str(MAX_FORK),
            "APPLIANCE_SERVICE__FROZEN_QUOTA_BYTES": str(FROZEN_QUOTA),
        },
    )
    service.start()
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture(autouse=True)
def clean_slate(live: LiveService) -> Iterator[None]:
    """Every test's sandboxes are deleted after it, and then nothing of them may remain."""
    yield
    if live.process is None or live.process.poll() is not None:
        return  # the test took the service down on purpose; the next start (or the module's end) cleans up
    with live.client() as api:
        for sandbox in api.get("/v1/sandboxes").json()["sandboxes"]:
            api.delete(f"/v1/sandboxes/{sandbox['id']}")
    assert_nothing_left(live)


def assert_nothing_left(live: LiveService) -> None:
    templates = live.run_dir / "templates"
    published = json.loads((templates / "current.json").read_text())["id"]
    # the keeper refills its pool after every hand-out: wait for that, then count
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if live.pooled() == live.pool_size and len(vm_pids(live.run_dir)) == live.pool_size:
            break
        time.sleep(0.2)
    assert [d.name for d in templates.glob("tpl-*")] == [published], "a fork's template outlived its clones"
    assert not list(templates.glob("fork-*")), "a fork's state stream was left behind"
    assert len(vm_pids(live.run_dir)) == live.pool_size, "a QEMU outlived its sandbox"
    snapshots = [p.name for p in (live.state_dir / "snapshots").glob("*") if p.is_dir()]
    assert snapshots == [], "a deleted sandbox's snapshot was left behind"


def vm_pids(directory: Path) -> list[int]:
    """QEMU processes under `directory`; a jailed VM's launcher (bwrap), whose command line names QEMU too, is not
    one."""
    pids = []
    for pid in qemu_pids_under(directory):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/comm").read_text().startswith("qemu-system"):
                pids.append(pid)
    return pids


def sdk(live: LiveService, **kwargs) -> Sandbox:
    return Sandbox(url=live.url, api_key=live.key, request_timeout=120, **kwargs)


def value(sandbox: Sandbox, code: str):
    result = sandbox.run_code(code)
    assert result.error is None, result.error
    return ast.literal_eval(result.text)


def ids(live: LiveService, state: str | None = None) -> list[str]:
    return [s["id"] for s in Sandbox.list(url=live.url, api_key=live.key, state=state)]


def vm_dir(live: LiveService, sandbox_id: str):
    return live.run_dir / "sandboxes" / f"vm-{sandbox_id}"


def exec_on_every_worker(live: LiveService, sandbox_id: str, code: str) -> list[str]:
    """Run `code` over fresh connections until every API worker has served it once; the answers' texts."""
    workers, texts = set(), []
    for _ in range(40):
        response = httpx.post(f"{live.url}/v1/sandboxes/{sandbox_id}/exec", headers=live.headers(),
                              json={"code": code}, timeout=120)
        assert response.status_code == 200, response.text
        texts.append(response.json()["text"])
        workers.add(response.headers["X-Appliance-Worker"])
        if len(workers) == live.workers:
            return texts
    pytest.fail(f"every request landed on the same worker: {workers}")


def on_another_worker(live: LiveService, path: str, worker: str, **kwargs) -> httpx.Response:
    """POST `path` over fresh connections until a worker other than `worker` answers."""
    for _ in range(40):
        response = httpx.post(f"{live.url}{path}", headers=live.headers(), timeout=120, **kwargs)
        if response.headers["X-Appliance-Worker"] != worker:
            return response
        assert response.status_code == 409, response.text  # the exec's own worker knows it is busy
    pytest.fail(f"every request landed on worker {worker}")


def cli(live: LiveService, *args: str) -> str:
    result = CliRunner().invoke(sandboxes_group, [*args, "--url", live.url, "--key", live.key])
    assert result.exit_code == 0, result.output
    return result.output


# ---- fork -------------------------------------------------------------------------------------------------------


def test_fork_copies_the_live_state_and_the_copies_are_independent(live):
    with sdk(live) as source:
        assert source.run_code(SETUP).error is None
        expected = value(source, STATE)
        kids = source.fork(2)
        try:
            assert len({source.id, *(k.id for k in kids)}) == 3
            assert {k.info["metadata"]["forked_from"] for k in kids} == {source.id}
            assert sorted(ids(live)) == sorted([source.id, *(k.id for k in kids)])
            for kid in kids:  # the same value, the same model output to the bit, the same file
                assert value(kid, STATE) == expected

            for i, kid in enumerate(kids):  # diverge: each copy changes its value, its model and its file
                kid.run_code(f"x += {i + 1}\nmodel.coef_[:] = {i}\n"
                             f"open('/data/work/notes.txt', 'a').write('copy {i}\\n')")
            assert [value(k, "x") for k in kids] == [42, 43]
            assert [value(k, "open('/data/work/notes.txt').read()") for k in kids] == [
                "written before\ncopy 0\n", "written before\ncopy 1\n"]
            assert value(source, STATE) == expected  # the source saw none of it

            draws = [value(s, DRAWS) for s in (source, *kids)]  # reseeded: random, numpy, kernel
            for column in range(3):
                assert len({draw[column] for draw in draws}) == 3, draws

            (grandkid,) = kids[0].fork(1)  # a fork of a fork
            with grandkid:
                assert grandkid.info["metadata"]["forked_from"] == kids[0].id
                assert value(grandkid, "x") == 42
                assert value(grandkid, "open('/data/work/notes.txt').read()") == "written before\ncopy 0\n"
                assert value(grandkid, DRAWS)[0] != value(kids[0], DRAWS)[0]
        finally:
            for kid in kids:
                kid.close()


def test_fork_over_the_limits_is_refused_up_front_and_the_source_is_unchanged(live):
    with sdk(live) as source:
        source.run_code("x = 'intact'")
        with pytest.raises(RateLimitError) as limited:
            source.fork(MAX_PER_KEY)  # 1 + 6 running > 6 per key
        assert "max_sandboxes_per_key" in limited.value.message and limited.value.retry_after > 0
        with pytest.raises(InvalidRequestError) as too_many:
            source.fork(MAX_FORK + 1)
        assert too_many.value.field == "n" and "max_fork" in too_many.value.message
        assert value(source, "x") == "intact"
        assert ids(live) == [source.id]


def test_a_failed_fork_leaves_the_source_running_unchanged_and_nothing_behind(live):
    with sdk(live) as source:
        source.run_code("x = [1, 2, 3]")
        live.wait_pool_full()
        qemus = set(qemu_pids_under(live.run_dir))
        templates = sorted((live.run_dir / "templates").glob("tpl-*"))
        # Inject a failure mid-fork: the file the source's RAM is written to is taken by a directory.
        blocker = live.run_dir / "templates" / f"fork-vm-{source.id}.ram"
        assert vm_dir(live, source.id).is_dir()
        blocker.mkdir()
        try:
            with pytest.raises(ServerError) as failed:
                source.fork(2)
        finally:
            blocker.rmdir()
        assert failed.value.status == 500 and "keeps running unchanged" in failed.value.message
        assert value(source, "x") == [1, 2, 3]
        assert ids(live) == [source.id]
        assert set(qemu_pids_under(live.run_dir)) == qemus
        assert sorted((live.run_dir / "templates").glob("tpl-*")) == templates


def test_a_sandbox_using_most_of_its_memory_forks_and_both_keep_the_data(live):
    # The host has room for a copy (a quarter of 512 MiB is counted): the fork must work. The refusal when it has
    # not (507) is proved in test_rules_live, against a service that sees a host short of memory.
    with sdk(live) as source:
        assert value(source, FILL) > 100
        expected = value(source, "int(big[::4096].sum())")
        (kid,) = source.fork(1)
        with kid:
            assert value(kid, "int(big[::4096].sum())") == expected
            assert value(kid, "big[0] = 2\nint(big[::4096].sum())") == expected + 1
        assert value(source, "int(big[::4096].sum())") == expected


# ---- freeze and resume ------------------------------------------------------------------------------------------


def test_freeze_stops_the_vm_and_resume_restores_the_state_and_the_clock(live):
    with sdk(live) as sandbox:
        assert sandbox.run_code(SETUP).error is None
        expected = value(sandbox, STATE)
        assert sandbox.freeze()["state"] == "frozen" and sandbox.info["expires_at"] is None
        assert qemu_pids_under(vm_dir(live, sandbox.id)) == []  # its memory is released
        assert ids(live, "frozen") == [sandbox.id] and ids(live, "running") == []
        listed = cli(live, "list", "--state", "frozen")
        assert sandbox.id in listed and "frozen" in listed
        time.sleep(3)  # a frozen guest's clock stands still: uncorrected, it would now be 3 s behind

        assert cli(live, "resume", sandbox.id) == f"{sandbox.id} running\n"
        before = time.time()
        guest = value(sandbox, "__import__('time').time()")
        after = time.time()
        assert before - 1 <= guest <= after + 1, f"guest clock {guest - after:+.2f} s off"
        assert value(sandbox, STATE) == expected
        assert sandbox.refresh()["state"] == "running"


def test_a_frozen_sandbox_is_resumed_by_the_next_call_from_anywhere(live):
    with sdk(live, persistent=True) as sandbox:
        sandbox.run_code("kept = {'a': 1}")
        sandbox.freeze()
        again = Sandbox.connect(sandbox.id, url=live.url, api_key=live.key)  # e.g. another process, tomorrow
        try:
            assert again.state == "frozen"
            assert value(again, "kept") == {"a": 1}
            assert again.refresh()["state"] == "running"
        finally:
            again.detach()


def test_every_worker_reaches_a_sandbox_that_was_frozen_and_resumed(live):
    with sdk(live) as sandbox:
        sandbox.run_code("kept = 'same'")
        exec_on_every_worker(live, sandbox.id, "kept")  # now every worker holds a connection to its VM
        sandbox.freeze()
        assert set(exec_on_every_worker(live, sandbox.id, "kept")) == {"'same'"}
        assert sandbox.refresh()["state"] == "running"


def test_an_idle_persistent_sandbox_is_frozen_not_closed(live):
    with sdk(live, persistent=True, idle_freeze_s=3) as sandbox:
        assert sandbox.info["persistent"] is True and sandbox.info["timeout_s"] == 3
        sandbox.run_code("kept = 'through the nap'")
        exec_on_every_worker(live, sandbox.id, "kept")  # whichever worker serves the wake-up call has seen it
        deadline = time.monotonic() + 60
        while sandbox.refresh()["state"] != "frozen":
            assert time.monotonic() < deadline, "the keeper did not freeze the idle sandbox"
            time.sleep(0.5)
        assert qemu_pids_under(vm_dir(live, sandbox.id)) == []
        assert value(sandbox, "kept") == "through the nap"


def test_freeze_over_the_frozen_quota_is_507_and_the_sandbox_keeps_running(live):
    with sdk(live) as sandbox:
        sandbox.run_code("x = 'awake'")
        # Fill the quota without writing gigabytes: the quota counts file sizes under the snapshots directory, and a
        # sparse file has a size. What is left (256 MiB) is less than this sandbox's 512 MiB may need.
        ballast = live.state_dir / "snapshots" / "ballast"
        ballast.parent.mkdir(parents=True, exist_ok=True)
        with open(ballast, "wb") as handle:
            handle.truncate(FROZEN_QUOTA - (256 << 20))
        try:
            with pytest.raises(InsufficientStorageError) as full:
                sandbox.freeze()
        finally:
            ballast.unlink()
        assert full.value.status == 507 and "frozen_quota_bytes" in full.value.message
        assert value(sandbox, "x") == "awake"
        assert sandbox.refresh()["state"] == "running"
        assert sandbox.freeze()["state"] == "frozen"  # with room again, it freezes


def test_fork_and_freeze_are_refused_while_code_runs_through_another_worker(live):
    with sdk(live) as sandbox:
        sandbox.run_code("x = 1")
        for action in ("fork", "freeze"):
            with live.client() as runner, runner.stream(
                "POST", f"/v1/sandboxes/{sandbox.id}/exec", json={"code": SLOW},
                headers={"Accept": "application/x-ndjson"},
            ) as running:
                lines = running.iter_lines()
                assert json.loads(next(lines))["type"] == "stdout"  # the code is running now
                refused = on_another_worker(live, f"/v1/sandboxes/{sandbox.id}/{action}",
                                            running.headers["X-Appliance-Worker"])
                assert refused.status_code == 409, refused.text
                done = json.loads(list(lines)[-1])
            assert done["text"] == "'done'" and done["sandbox_lost"] is False
        assert value(sandbox, "x") == 1
        assert ids(live) == [sandbox.id] and sandbox.refresh()["state"] == "running"


# ---- across restarts (these stop the service) --------------------------------------------------------------------


def frozen_and_detached(live) -> tuple[Sandbox, object]:
    """A persistent sandbox with SETUP's state, frozen and let go of; and the STATE it must come back with."""
    sandbox = sdk(live, persistent=True)
    assert sandbox.run_code(SETUP).error is None
    expected = value(sandbox, STATE)
    sandbox.freeze()
    sandbox.detach()
    return sandbox, expected


def test_a_frozen_sandbox_survives_a_service_restart(live):
    sandbox, expected = frozen_and_detached(live)
    live.restart()
    again = Sandbox.connect(sandbox.id, url=live.url, api_key=live.key)
    with again:
        assert again.state == "frozen"
        assert again.resume()["state"] == "running"
        assert value(again, STATE) == expected


def test_a_frozen_sandbox_survives_killing_everything_and_an_empty_tmpfs(live):
    sandbox, expected = frozen_and_detached(live)
    # As a host crash: the service and every VM killed, the tmpfs run dir (templates, VM files, sockets) gone.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(live.master_pid, signal.SIGKILL)
    live.process.wait(timeout=30)
    kill_qemus_under(live.run_dir)
    for child in live.run_dir.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()
    live.restart()  # a fresh start: the keeper boots and warms a new template
    with Sandbox.connect(sandbox.id, url=live.url, api_key=live.key) as again:
        assert again.state == "frozen"
        assert value(again, STATE) == expected  # the call resumes it
        assert value(again, "__import__('os').path.exists('/data/work/notes.txt')") is True
    with pytest.raises(NotFoundError):
        Sandbox.connect(sandbox.id, url=live.url, api_key=live.key)


def test_stopping_the_service_at_the_end_leaves_no_qemu(live):
    assert ids(live) == []
    assert_nothing_left(live)
    live.process.send_signal(signal.SIGTERM)
    live.process.wait(timeout=60)
    assert qemu_pids_under(live.run_dir) == []
