"""Starting the agent's children: the Python worker and bash commands, each in its own process group.

posix_spawn instead of subprocess.Popen: the agent reaps every child itself with waitpid(-1) (it is PID 1 and
must collect orphans too), and Popen's own bookkeeping would race it for the worker's exit status.
"""

from __future__ import annotations

import os
import signal

from appliance_agent import codegroups, sysops
from appliance_agent.protocol import LineReader

TYPE_CHECKING = False
if TYPE_CHECKING:
    from appliance_agent.codeuser import CodeUser

PIPE_SIZE = 1 << 20
SETPRIV = "/usr/bin/setpriv"  # util-linux, essential in Debian
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The worker starts with -c, so sys.path[0] is "" as in an interactive interpreter; it finds this package
# through the path given as an argument and removes it again before running user code.
_WORKER_BOOT = "import sys;sys.path.insert(0,sys.argv[1]);from appliance_agent.worker import main;main(sys.argv[2:])"


def spawn(
    argv: list[str],
    stdio: tuple[int, int, int],
    pass_fds: tuple[int, ...] = (),
    default_signals: tuple[int, ...] = sysops.CHILD_DEFAULT_SIGNALS,
    cgroup_procs: str | None = None,
    env: dict[str, str] | None = None,
) -> int:
    """Start argv in a new process group with the given fds as 0, 1, 2 (plus pass_fds, kept at their numbers),
    and in the cgroup whose cgroup.procs file is given, if any (codegroups.py).

    All other descriptors of the agent are close-on-exec (Python's default), so they do not leak.
    """
    actions = [(os.POSIX_SPAWN_DUP2, source, target) for target, source in enumerate(stdio)]
    for fd in pass_fds:
        os.set_inheritable(fd, True)
    try:
        codegroups.enter(cgroup_procs)
    except OSError as exc:
        sysops.log(f"cannot start {argv[0]} in its cgroup ({exc}); starting it without")
        cgroup_procs = None
    try:
        return os.posix_spawn(
            argv[0],
            argv,
            dict(os.environ) if env is None else env,
            file_actions=actions,
            setpgroup=0,
            setsigdef=default_signals,
            setsigmask=(),
        )
    finally:
        try:
            codegroups.leave(cgroup_procs)
        except OSError as exc:  # the agent stays in the group: its limit now counts the agent too
            sysops.log(f"cannot move the agent back to its own cgroup: {exc}")
        for fd in pass_fds:
            os.set_inheritable(fd, False)


def _pipe() -> tuple[int, int]:
    read_fd, write_fd = os.pipe()
    sysops.set_pipe_size(read_fd, PIPE_SIZE)
    os.set_blocking(read_fd, False)
    return read_fd, write_fd


pipe = _pipe  # for commands.py: the same pipes as the worker's and bash's


class Child:
    """A child process and the read ends of its stdout and stderr pipes.

    A retired child's output is no longer wanted, but its pipes stay open (and are read and dropped) until
    end-of-file: a background job it left behind would otherwise die of SIGPIPE on its next write.
    (Plain classes: `dataclasses` costs boot time under TCG.)
    """

    def __init__(self, pid: int, stdout: int, stderr: int) -> None:
        self.pid = pid
        self.stdout = stdout
        self.stderr = stderr
        self.at_eof: set[int] = set()
        self.retired = False


class WorkerProcess(Child):
    def __init__(self, pid: int, stdout: int, stderr: int, requests: int, control: int) -> None:
        super().__init__(pid, stdout, stderr)
        self.requests = requests  # write end, agent -> worker
        self.control = control  # read end, worker -> agent
        self.control_reader = LineReader()
        self.ready = False
        self.held: list[bytes] = []  # requests waiting for ready


def start_worker(
    *, die_with_agent: bool, cgroup_procs: str | None = None, user: CodeUser | None = None,
    extra_env: dict[str, str] | None = None,
) -> WorkerProcess:
    """Start `python -c <boot> ...` running appliance_agent.worker.main with fresh pipes.

    die_with_agent asks the worker to set PR_SET_PDEATHSIG (on a host, so that a killed agent does not leave
    a worker behind; in the guest the agent is PID 1 and its death ends everything anyway).
    user: the worker drops to this user before it reads a request (worker.main); None keeps the agent's.
    """
    request_read, request_write = os.pipe()
    control_read, control_write = _pipe()
    out_read, out_write = _pipe()
    err_read, err_write = _pipe()
    null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    argv = [
        sysops.python_executable(),
        "-c",
        _WORKER_BOOT,
        _PACKAGE_PARENT,
        str(request_read),
        str(control_write),
        "1" if die_with_agent else "0",
        *((str(user.uid), str(user.gid)) if user is not None else ()),
    ]
    try:
        # SIGINT stays ignored (as in the agent) until the worker has installed its own handler.
        no_sigint = tuple(sig for sig in sysops.CHILD_DEFAULT_SIGNALS if sig != signal.SIGINT)
        env = {**os.environ, **(extra_env or {})}
        pid = spawn(argv, (null, out_write, err_write), (request_read, control_write), no_sigint, cgroup_procs,
                    env if user is None else user.environment(env))
    except OSError:
        for fd in (request_read, request_write, control_read, out_read, err_read):
            os.close(fd)
        raise
    finally:
        for fd in (null, request_read, control_write, out_write, err_write):
            os.close(fd)
    os.set_blocking(request_write, False)
    return WorkerProcess(pid=pid, stdout=out_read, stderr=err_read, requests=request_write, control=control_read)


def start_bash(code: str, cgroup_procs: str | None = None, user: CodeUser | None = None,
               extra_env: dict[str, str] | None = None) -> Child:
    """`/bin/bash -c code` with stdin from /dev/null, in the agent's working directory (/data in the guest), as
    `user` if given (through setpriv: posix_spawn cannot change the uid, and a fork of the agent costs more)."""
    out_read, out_write = _pipe()
    err_read, err_write = _pipe()
    null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        argv = ["/bin/bash", "-c", code]
        env = {**os.environ, **(extra_env or {})}
        if user is not None:
            argv = [SETPRIV, f"--reuid={user.uid}", f"--regid={user.gid}", "--clear-groups", "--", *argv]
            env = user.environment(env)
        pid = spawn(argv, (null, out_write, err_write), cgroup_procs=cgroup_procs, env=env)
    except OSError:
        os.close(out_read)
        os.close(err_read)
        raise
    finally:
        for fd in (null, out_write, err_write):
            os.close(fd)
    return Child(pid=pid, stdout=out_read, stderr=err_read)
