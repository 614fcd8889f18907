"""Guest cgroups for user code (cgroup v2, mounted by appliance-init): the REPL worker and bash commands each
start in a cgroup of their own with a pids limit. A fork bomb then meets EAGAIN instead of starving the agent
(PID 1, left in the root cgroup), and whatever a killed worker or command left behind (setsid or not) is ended at
once with cgroup.kill. Only the agent as PID 1 of a guest uses this; on a host (tests) it stays disabled.
"""

from __future__ import annotations

import os
import time

ROOT = "/sys/fs/cgroup"
WORKER, BASH = "worker", "bash"
# Processes and threads per group: far above what data work needs (numpy/BLAS threads, a multiprocessing pool),
# far below what starves a 1-vCPU guest.
PIDS_MAX = 512


class CodeGroups:
    def __init__(self, root: str = ROOT, pids_max: int = PIDS_MAX) -> None:
        self.root = root
        self.pids_max = pids_max
        self.enabled = False

    def setup(self) -> str | None:
        """Create the groups; returns why not (the agent logs it and runs user code without them)."""
        try:
            _write(os.path.join(self.root, "cgroup.subtree_control"), "+pids")
            for name in (WORKER, BASH):
                path = os.path.join(self.root, name)
                if not os.path.isdir(path):
                    os.mkdir(path)
                _write(os.path.join(path, "pids.max"), str(self.pids_max))
        except OSError as exc:
            return f"no cgroup limits for user code: {exc}"
        self.enabled = True
        return None

    def procs_file(self, name: str | None) -> str | None:
        """Where a child to start in group `name` is put (None: no group)."""
        if not self.enabled or name is None:
            return None
        return os.path.join(self.root, name, "cgroup.procs")

    def kill(self, name: str, reap, timeout_s: float = 2.0) -> None:
        """SIGKILL everything in the group, then let `reap` (the agent's reaper) collect it until the group is
        empty: zombies still count against pids.max, and the next worker starts in the same group."""
        if not self.enabled:
            return
        group = os.path.join(self.root, name)
        try:
            _write(os.path.join(group, "cgroup.kill"), "1")
        except OSError:
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            reap()
            try:
                with open(os.path.join(group, "pids.current")) as current:
                    if current.read().strip() == "0":
                        return
            except OSError:
                return
            time.sleep(0.002)


def enter(procs_file: str | None) -> None:
    """Move the calling process (the agent) into a group, so the child it spawns next starts there: no moment in
    which the child could fork outside it. leave() moves the agent back."""
    if procs_file is not None:
        _write(procs_file, str(os.getpid()))


def leave(procs_file: str | None) -> None:
    if procs_file is not None:
        root = os.path.dirname(os.path.dirname(procs_file))
        _write(os.path.join(root, "cgroup.procs"), str(os.getpid()))


def _write(path: str, value: str) -> None:
    with open(path, "w") as handle:
        handle.write(value)
