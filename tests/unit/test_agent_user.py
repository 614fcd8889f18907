"""User code under its own uid (codeuser.py): it cannot reach the agent's descriptors, and the files API acts with
the code user's rights. The agent runs on this host as root with --code-user nobody, as in a guest with `sandbox`."""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from appliance_agent import frames

from tests.unit.test_agent import AgentFactory

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="changing the code user needs root")

NOBODY = pwd.getpwnam("nobody")

# pidfd_getfd(2) (Python has pidfd_open but no wrapper for it): the errno, or 0 if it handed the descriptor over.
_PIDFD_GETFD = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
pidfd = os.pidfd_open({pid})
got = libc.syscall(438, pidfd, 0, 0)  # SYS_pidfd_getfd on x86_64: the agent's fd 0, its host channel
0 if got >= 0 else ctypes.get_errno()
"""


def test_user_code_runs_as_the_code_user_and_cannot_take_the_agents_descriptors(agent_factory: AgentFactory) -> None:
    agent = agent_factory("--code-user", "nobody")
    assert agent.run("import os; os.getuid(), os.geteuid(), os.getgid()").value == (
        f"({NOBODY.pw_uid}, {NOBODY.pw_uid}, {NOBODY.pw_gid})"
    )
    assert agent.run("import os; os.environ['HOME']").value == repr(NOBODY.pw_dir)
    bash = agent.run("id -u; id -G", language="bash")
    assert bash.stdout.split() == [str(NOBODY.pw_uid), str(NOBODY.pw_gid)], bash.stdout
    # The agent runs as root and is not dumpable: another uid may neither take its descriptors nor list them.
    assert agent.run(_PIDFD_GETFD.format(pid=agent.pid)).value == str(1)  # EPERM
    listing = agent.run(f"import os; os.listdir('/proc/{agent.pid}/fd')")
    assert listing.error is not None and listing.error["name"] == "PermissionError", listing.done
    # The agent itself still works, and so does the worker (a fresh one after a crash is the user again).
    assert agent.run("import os; os._exit(3)").error["name"] == "WorkerExited"
    assert agent.run("import os; os.getuid()").value == str(NOBODY.pw_uid)


def test_without_a_code_user_root_code_can_take_them(agent_factory: AgentFactory) -> None:
    """The opt-in (engine.code_user = "root"): what the test above refuses is then possible, which is why it is
    not the default (and shows that the check above is not refused for some other reason)."""
    agent = agent_factory()
    assert agent.run(_PIDFD_GETFD.format(pid=agent.pid)).value == "0"


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory the code user can reach (pytest's tmp_path is under a root-only 0700 directory)."""
    path = Path(tempfile.mkdtemp(prefix="appliance-user-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def test_the_files_api_acts_with_the_code_users_rights(agent_factory: AgentFactory, open_dir: Path) -> None:
    shared = open_dir / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    private = open_dir / "private"
    private.mkdir(mode=0o700)
    (private / "secret").write_text("root's")
    agent = agent_factory("--code-user", "nobody")
    agent.send_raw(frames.encode({"id": 99, "op": "file_write", "path": str(shared / "new"), "append": False}, b"hi"))
    written = agent.events_for(99)[-1]
    assert written["ev"] == "ok", written
    assert (shared / "new").stat().st_uid == NOBODY.pw_uid  # the user can change what it was given
    refused = agent.call("file_read", path=str(private / "secret"), offset=0, max=100)
    assert refused["ev"] == "error" and refused["code"] == "permission_denied", refused
    # and the agent is root again afterwards: a root-only request still works
    assert agent.call("ping")["ev"] == "pong"
