"""Guest cgroups for user code (cgroup v2, mounted by appliance-init): the REPL worker and bash commands each
start in a cgroup of their own with a pids limit; the agent (PID 1) moves into a group of its own with a cpu.weight
ten times theirs. A fork bomb then meets EAGAIN, and a CPU swarm cannot starve the agent (the code groups keep
the default weight: against the kernel's own threads, such as reclaim near an OOM, they weigh as before), and
whatever a killed worker or command left behind (setsid or not) is ended with cgroup.freeze, then cgroup.kill:
the kernel stops and ends them without their cooperation. The groups' files belong to root, so user code (the
unprivileged code user, codeuser.py) cannot move itself out or change the limits. Only the agent as PID 1 of a
guest uses this; on a host (tests) it stays disabled.
"""

from __future__ import annotations

import os
import time

ROOT = "/sys/fs/cgroup"
WORKER, BASH, AGENT = "worker", "bash", "agent"
COMMANDS = "commands"  # background commands (commands.py): never killed with a bash exec's group
# Processes and threads per group: far above what data work needs (numpy/BLAS threads, a multiprocessing pool),
# far below what starves a 1-vCPU guest.
PIDS_MAX = 512
# cpu.weight of the agent's group (1..10000; the code groups keep the default, 100): busy user code can use an
# idle CPU in full, but the agent gets it back at once when it has work.
AGENT_CPU_WEIGHT = 1000


class CodeGroups:
    def __init__(self, root: str = ROOT, pids_max: int = PIDS_MAX) -> None:
        self.root = root
        self.pids_max = pids_max
        self.enabled = False

    def setup(self) -> str | None:
        """Create the groups; returns why not (the agent logs it and runs user code without them)."""
        try:
            _write(os.path.join(self.root, "cgroup.subtree_control"), "+pids")
            for name in (WORKER, BASH, COMMANDS):
                path = os.path.join(self.root, name)
                if not os.path.isdir(path):
                    os.mkdir(path, 0o755)
                _write(os.path.join(path, "pids.max"), str(self.pids_max))
        except OSError as exc:
            return f"no cgroup limits for user code: {exc}"
        self.enabled = True
        try:
            agent = os.path.join(self.root, AGENT)
            if not os.path.isdir(agent):
                os.mkdir(agent, 0o755)
            _write(os.path.join(agent, "cgroup.procs"), str(os.getpid()))
            _write(os.path.join(self.root, "cgroup.subtree_control"), "+cpu")
            _write(os.path.join(agent, "cpu.weight"), str(AGENT_CPU_WEIGHT))
        except OSError as exc:
            return f"no cpu weight for the agent: {exc}"
        return None

    def procs_file(self, name: str | None) -> str | None:
        """Where a child to start in group `name` is put (None: no group)."""
        if not self.enabled or name is None:
            return None
        return os.path.join(self.root, name, "cgroup.procs")

    def kill(self, name: str, reap, timeout_s: float = 2.0) -> None:
        """Freeze the group (no process of it runs or forks again), SIGKILL everything in it (a frozen process
        still dies of SIGKILL), then let `reap` (the agent's reaper) collect it until the group is empty: zombies
        still count against pids.max. The group is thawed again: the next worker starts in it."""
        if not self.enabled:
            return
        group = os.path.join(self.root, name)
        freeze = os.path.join(group, "cgroup.freeze")
        try:
            _write(freeze, "1")
        except OSError:
            freeze = ""
        try:
            _write(os.path.join(group, "cgroup.kill"), "1")
            self._wait_empty(group, reap, timeout_s)
        except OSError:
            pass  # no cgroup.kill (an old kernel): the process group kill before this is all there is
        finally:
            if freeze:
                try:
                    _write(freeze, "0")
                except OSError as exc:
                    from appliance_agent.sysops import log

                    log(f"cannot thaw {group}: {exc}")

    @staticmethod
    def _wait_empty(group: str, reap, timeout_s: float) -> None:
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
    """Back to the agent's own group (the root group if it has none)."""
    if procs_file is not None:
        root = os.path.dirname(os.path.dirname(procs_file))
        try:
            _write(os.path.join(root, AGENT, "cgroup.procs"), str(os.getpid()))
        except FileNotFoundError:
            _write(os.path.join(root, "cgroup.procs"), str(os.getpid()))


def _write(path: str, value: str) -> None:
    with open(path, "w") as handle:
        handle.write(value)
