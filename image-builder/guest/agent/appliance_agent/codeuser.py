"""Who user code runs as in the guest: the unprivileged `sandbox` user by default, root only when the deployment
opts in (engine.code_user, passed on the kernel command line as protocol.CODE_USER_ARG=root).

Under another uid than the agent, and with the agent not dumpable, user code cannot take the agent's descriptors
(pidfd_getfd), trace it, read /proc/<agent>/fd, or write the cgroup files that keep it in its own group.
"""

from __future__ import annotations

import contextlib
import os

from appliance_agent import protocol

CMDLINE = "/proc/cmdline"


class CodeUser:
    """A plain class (`dataclasses` costs boot time under TCG)."""

    def __init__(self, name: str, uid: int, gid: int, home: str) -> None:
        self.name = name
        self.uid = uid
        self.gid = gid
        self.home = home

    @property
    def privileged(self) -> bool:
        return self.uid == 0

    def environment(self, base: dict[str, str]) -> dict[str, str]:
        """The environment of a process that runs user code: the agent's, with this user's HOME and names."""
        return {**base, "HOME": self.home, "USER": self.name, "LOGNAME": self.name}

    @contextlib.contextmanager
    def acting(self):
        """Act with this user's file rights for a moment (the agent's files API): the agent keeps root as its real
        and saved uid and comes back to it. A link planted by user code then cannot make the agent touch what
        the user may not; what the agent creates belongs to the user."""
        if self.privileged or os.geteuid() != 0:
            yield
            return
        os.setegid(self.gid)
        os.seteuid(self.uid)
        try:
            yield
        finally:
            os.seteuid(0)
            os.setegid(0)


def resolve(name: str) -> CodeUser:
    """KeyError if the guest has no such user."""
    import pwd

    entry = pwd.getpwnam(name)
    return CodeUser(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir)


def from_cmdline(path: str = CMDLINE) -> str:
    """The user named on the kernel command line, or the default."""
    try:
        with open(path) as handle:
            words = handle.read().split()
    except OSError:
        words = []
    for word in words:
        key, _, value = word.partition("=")
        if key == protocol.CODE_USER_ARG and value in protocol.CODE_USERS:
            return value
    return "sandbox"
