"""Hostile code in a jailed sandbox: each case ends with a clear error on that call and either a usable sandbox or
a clear "sandbox lost"; the host and a bystander sandbox stay healthy throughout."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import pytest

from service.engine import Engine, SandboxLost
from tests.configs import exec_limits

pytestmark = pytest.mark.integration
GUEST_MIB = 1024


@pytest.fixture(scope="module")
def bystander(jailed_engine):
    with jailed_engine.boot(memory_mib=512) as sandbox:
        assert sandbox.run_code("calm = 'yes'").error is None
        yield sandbox


@pytest.fixture(scope="module")
def root_engine(jailed_engine):
    """The opt-in, jailed: user code as root in the guest (engine.code_user = "root"), for what only root could
    try. (Overrides the plain engine's of conftest.py: these cases need the jail too.)"""
    config = replace(jailed_engine.config, code_user="root", run_dir=jailed_engine.config.run_dir.with_name("root"))
    return Engine(config)


def _victim(engine: Engine):
    """A fresh sandbox per case (a case may cost it); closed after, whatever happened."""
    sandbox = engine.boot(memory_mib=GUEST_MIB)
    sandbox.limits = exec_limits(timeout_s=10, grace_s=2, output_cap=64 << 10)
    assert sandbox.run_code("kept = 41").error is None
    yield sandbox
    sandbox.close()


@pytest.fixture
def root_victim(root_engine):
    yield from _victim(root_engine)


@pytest.fixture
def victim(jailed_engine):
    yield from _victim(jailed_engine)


def mem_available_mib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    raise AssertionError("no MemAvailable")


def assert_healthy(bystander, victim=None) -> None:
    assert bystander.run_code("calm").text == "'yes'"
    if victim is not None:
        assert victim.run_code("1 + 1", timeout_s=30).text == "2"


def test_python_infinite_loop_is_interrupted_and_state_kept(victim, bystander):
    result = victim.run_code("while True:\n    pass", timeout_s=2)
    assert result.error["name"] == "TimeoutError"
    assert victim.run_code("kept").text == "41"
    assert_healthy(bystander, victim)


def test_loop_inside_numpy_is_killed_after_the_grace(victim, bystander):
    # One long C call: SIGINT is only seen between bytecodes, so the agent must kill the worker after the grace.
    # A naive five-index einsum on 300x300 arrays is one C loop of 300**5 steps: hours under TCG, still far longer
    # than timeout + grace on KVM, so the interrupt always lands inside it. numpy is imported before the timed call,
    # so the interrupt cannot land in the import's Python code instead.
    assert victim.run_code("import numpy as np\nb = np.ones((300, 300))").error is None
    result = victim.run_code("np.einsum('ij,jk,kl,lm->im', b, b, b, b, optimize=False)", timeout_s=3)
    assert result.error["name"] == "TimeoutError", result.error
    assert result.error["value"] == ("execution exceeded 3 s and did not stop within 2 s of the interrupt; "
                                     "the Python process was killed and its state is lost")
    assert result.worker_restarted
    assert result.worker_exit == "the Python process was killed after ignoring the interrupt for 2 s; its state is lost"
    assert victim.run_code("kept").error["name"] == "NameError"  # a fresh worker: the namespace went with the old
    assert_healthy(bystander, victim)


def test_memory_bomb_kills_the_worker_not_the_host_or_the_neighbour(victim, bystander):
    before = mem_available_mib()
    lowest = [before]
    answers: list[str | None] = []  # the bystander's answers while the bomb runs (asserted here, not in the thread)
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            lowest[0] = min(lowest[0], mem_available_mib())
            # a hang deadline only: how fast the bystander answers under load is a benchmark's question
            try:
                answers.append(bystander.run_code("calm", timeout_s=60).text)
            except Exception as exc:  # reported by the assert below, in the test's own thread
                answers.append(repr(exc))
                return
            done.wait(0.2)  # paces the probes; the loop ends as soon as the bomb is over

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        # a deadline that only catches a hang: under TCG on a loaded host the guest may take a minute to run out
        result = victim.run_code("hog = []\nwhile True:\n    hog.append(bytearray(16 << 20))", timeout_s=240)
    finally:
        done.set()
        watcher.join()
    assert result.error["name"] == "WorkerExited", result.error
    assert result.worker_restarted
    assert result.worker_exit == "the Python process was killed by signal SIGKILL (9); its state is lost"
    assert answers and set(answers) == {"'yes'"}, answers
    # the host lost at most the victim's cgroup limit (guest RAM + QEMU overhead), not everything
    limit_mib = GUEST_MIB + 512  # the jail's default memory overhead
    assert before - lowest[0] < limit_mib + 256
    assert_healthy(bystander, victim)


@pytest.mark.parametrize("escape", [False, True], ids=["plain", "setsid"])
def test_fork_bomb_meets_the_pids_limit_and_the_sandbox_stays_usable(victim, bystander, escape):
    # The worker runs in a guest cgroup with pids.max (appliance_agent/codegroups.py): the bomb gets EAGAIN and the
    # deadline ends it. In the setsid case the bomb leaves the worker's process group and session, and the worker
    # ignores the interrupt, so it is killed after the grace: cgroup.kill must then end every copy too.
    spin = "while True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    if escape:
        bomb = ("import os, signal, time\nif os.fork() == 0:\n    os.setsid()\n" + "".join(
            "    " + line + "\n" for line in spin.splitlines()) + "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
            "time.sleep(3600)\n")
    else:
        bomb = "import os\n" + spin
    result = victim.run_code(bomb, timeout_s=5)
    assert result.error is not None and result.error["name"] in {"TimeoutError", "WorkerExited"}
    assert_healthy(bystander, victim)
    # Nothing of the bomb is left running in the guest: only the agent, the new worker and this check.
    count = victim.run_code("import os; sum(1 for p in os.listdir('/proc') if p.isdigit() and "
                            "open(f'/proc/{p}/cmdline').read())").text
    assert int(count) <= 4, count


def test_user_code_runs_in_its_limited_cgroup(victim):
    group = victim.run_code("open('/proc/self/cgroup').read().strip()").text
    assert group == "'0::/worker'"
    assert victim.run_code("open('/sys/fs/cgroup/worker/pids.max').read().strip()").text == "'512'"
    bash = victim.run_code("cat /proc/self/cgroup", language="bash")
    assert bash.stdout.strip() == "0::/bash"
    # The agent (PID 1) is in a group of its own: a bomb in the worker's group cannot take its last pid.
    assert victim.run_code("open('/proc/1/cgroup').read().strip()").text == "'0::/agent'"


def test_output_flood_is_capped_and_stopped(victim, bystander):
    result = victim.run_code("while True:\n    print('x' * 1000)", timeout_s=3)
    assert result.error["name"] == "TimeoutError"
    assert len(result.stdout) + len(result.stderr) < victim.limits.output_cap + 1024
    assert result.truncated_bytes > 0
    assert_healthy(bystander, victim)


def test_a_flood_of_displays_is_held_to_the_hosts_budget(victim, bystander):
    """Displays are not stdout: the agent's output cap does not see them. The host's budget does."""
    victim.limits = replace(victim.limits, result_cap=1 << 20)
    code = "class Big:\n    def _repr_html_(self): return 'x' * (2 << 20)\nfor _ in range(8): display(Big())"
    result = victim.run_code(code, timeout_s=120)
    held = len(result.stdout) + len(result.stderr) + sum(len(str(bundle)) for bundle in result.displays)
    assert result.error is None and held <= (1 << 20) + 4096  # the budget, and the host's one-line marker
    assert "budget was dropped" in result.stderr and result.truncated_bytes >= 7 * (2 << 20)
    assert victim.run_code("kept").text == "41"  # the sandbox stays usable, its namespace kept
    assert_healthy(bystander, victim)


@pytest.mark.parametrize("directory", ["/data", "/tmp"])
def test_filling_a_disk_is_a_normal_enospc(victim, bystander, directory):
    code = (
        f"f = open('{directory}/filler', 'wb')\n"
        "block = b'\\0' * (8 << 20)\n"
        "while True:\n    f.write(block); f.flush()"
    )
    result = victim.run_code(code, timeout_s=60)
    assert result.error is not None and "No space left" in result.error["value"], result.error
    assert victim.run_code(f"import os; f.close(); os.remove('{directory}/filler'); 'freed'").text == "'freed'"
    assert_healthy(bystander, victim)


def test_os_exit_and_self_kill_restart_the_worker(victim, bystander):
    result = victim.run_code("import os; os._exit(0)")
    assert result.worker_restarted and "exited with code 0" in result.worker_exit
    result = victim.run_code("import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    assert result.worker_restarted and "SIGKILL" in result.worker_exit
    assert_healthy(bystander, victim)


def test_writing_the_guest_kernel_through_dev_mem_is_refused(root_victim, bystander):
    # The guest kernel (Debian's cloud kernel) is built with STRICT_DEVMEM: /dev/mem refuses System RAM above the
    # first MiB, so root in the guest cannot patch its own kernel's code through it. The call fails, nothing else.
    code = (
        "start = next(int(line.split('-')[0], 16) for line in open('/proc/iomem') if 'Kernel code' in line)\n"
        "assert start >= 1 << 20, hex(start)  # a real address (root sees them), beyond the first MiB\n"
        "f = open('/dev/mem', 'r+b', buffering=0)\n"
        "f.seek(start)\n"
        "f.write(b'\\xff' * 4096)"
    )
    result = root_victim.run_code(code, timeout_s=10)
    assert result.error is not None, "the write to the kernel's code went through"
    assert (result.error["name"], result.error["value"]) == ("PermissionError", "[Errno 1] Operation not permitted")
    assert not result.worker_restarted
    assert root_victim.run_code("kept").text == "41"
    assert_healthy(bystander, root_victim)


def test_guest_kernel_crash_is_a_clear_sandbox_lost(root_victim, bystander):
    with pytest.raises(SandboxLost, match="sandbox lost"):
        root_victim.run_code("open('/proc/sysrq-trigger', 'w').write('c')", timeout_s=10)
    assert root_victim.closed
    assert_healthy(bystander)
