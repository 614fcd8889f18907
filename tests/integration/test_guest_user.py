"""User code in the guest runs as the unprivileged `sandbox` user and cannot reach the agent (PID 1, root, not
dumpable): not its descriptors, not its cgroup. And a host's connect wakes the agent (SIGIO), no probe needed."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from appliance_agent.frames import PAYLOAD_KEY
from appliance_agent.protocol import CODE_USER_ID

from service.engine import Sandbox

pytestmark = pytest.mark.integration

# pidfd_getfd(2) on the agent's descriptor 3 (its first own file: a pipe or a port): the errno, 0 on success.
_PIDFD_GETFD = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
pidfd = os.pidfd_open(1)
got = libc.syscall(438, pidfd, 3, 0)  # SYS_pidfd_getfd on x86_64
0 if got >= 0 else ctypes.get_errno()
"""


@pytest.fixture(scope="module")
def guest(engine) -> Iterator[list[Sandbox]]:
    """One VM with two agent ports for the module; port 1 stays unconnected until a test connects it."""
    sandbox = engine.boot(agent_ports=2)
    held = [sandbox]
    yield held
    for connection in held[1:]:
        connection.detach()
    sandbox.close()


def test_user_code_is_the_sandbox_user(guest):
    sandbox = guest[-1]
    assert sandbox.run_code("import os; os.getuid(), os.geteuid(), os.getgid()").text == (
        f"({CODE_USER_ID}, {CODE_USER_ID}, {CODE_USER_ID})"
    )
    assert sandbox.run_code("id -un; echo $HOME; pwd", language="bash").stdout.split() == [
        "sandbox", "/home/sandbox", "/data"]
    # its own files: written through the files API (the agent acts as the user), changed by its code
    assert sandbox.call("file_write", payload=b"from the host\n", path="given.txt", append=False)["ev"] == "ok"
    assert sandbox.run_code("open('given.txt', 'a').write('and the code\\n')").error is None
    read = sandbox.call("file_read", path="given.txt", offset=0, max=100)
    assert read[PAYLOAD_KEY] == b"from the host\nand the code\n"


def test_user_code_cannot_take_the_agents_descriptors(guest):
    sandbox = guest[-1]
    assert sandbox.run_code(_PIDFD_GETFD).text == "1"  # EPERM
    listing = sandbox.run_code("import os; os.listdir('/proc/1/fd')")
    assert listing.error is not None and listing.error["name"] == "PermissionError", listing.error
    memory = sandbox.run_code("open('/proc/1/mem', 'rb')")
    assert memory.error is not None and memory.error["name"] == "PermissionError", memory.error


def test_user_code_cannot_leave_its_cgroup(guest):
    sandbox = guest[-1]
    for target in ("/sys/fs/cgroup/cgroup.procs", "/sys/fs/cgroup/bash/cgroup.procs"):
        moved = sandbox.run_code(f"import os; open({target!r}, 'w').write(str(os.getpid()))")
        assert moved.error is not None and moved.error["name"] == "PermissionError", (target, moved.error)
    made = sandbox.run_code("import os; os.mkdir('/sys/fs/cgroup/worker/mine')")
    assert made.error is not None and made.error["name"] == "PermissionError", made.error
    assert sandbox.run_code("open('/proc/self/cgroup').read().strip()").text == "'0::/worker'"
    # the agent's group outweighs user code's ten times: a CPU swarm cannot starve it
    weights = sandbox.run_code("[open(f'/sys/fs/cgroup/{g}/cpu.weight').read().strip() for g in ('agent', 'worker')]")
    assert weights.text == "['1000', '100']"


def test_a_second_port_is_served_as_the_sandbox_user(engine, guest):
    """A host connecting to another agent port (as a second API worker does) is served, with user code as the
    sandbox user there too."""
    sandbox = guest[0]
    assert sandbox.run_code("1").text == "1"
    second = engine.connect(sandbox.vm_dir, engine.machine_json(sandbox), 1)
    guest.append(second)
    assert second.run_code("6 * 7").text == "42"
    assert second.run_code("import os; os.getuid()").text == "1000"


def test_the_kernels_root_interfaces_are_closed_to_user_code(guest):
    """What test_hostile tries as root (the opt-in) is not even open to the default user."""
    sandbox = guest[0]
    for path, mode in (("/proc/sysrq-trigger", "w"), ("/dev/mem", "r+b")):
        opened = sandbox.run_code(f"open({path!r}, {mode!r})")
        assert opened.error is not None and opened.error["name"] == "PermissionError", (path, opened.error)
