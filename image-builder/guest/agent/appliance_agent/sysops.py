"""Operating-system chores of the agent: the guest environment, the kernel RNG, the clock, process status text.

Everything here is a thin wrapper over a system call, kept apart so that agent.py reads as protocol logic.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import struct
import sys
import termios
import time

DATA_DIR = "/data"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# <linux/random.h>: _IOW('R', 0x03, int[2]) and _IO('R', 0x07).
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207

# <linux/prctl.h>
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_CHILD_SUBREAPER = 36

# Signals a child must get back at their default disposition: the agent ignores some of them, and Python
# itself ignores SIGPIPE and SIGXFSZ; an ignored disposition survives exec.
CHILD_DEFAULT_SIGNALS = tuple(
    sig
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGPIPE, signal.SIGXFSZ)
    if isinstance(sig, signal.Signals)
)


def format_exc() -> str:
    """The current exception's traceback; `traceback` is imported only when something went wrong."""
    import traceback

    return traceback.format_exc()


def log(message: str) -> None:
    """One line on the agent's stderr (the guest console); never raises."""
    with contextlib.suppress(OSError):
        os.write(2, f"appliance-agent: {message}\n".encode("utf-8", errors="replace"))


def prepare_process() -> None:
    """Make the process fit to run user code whether it is PID 1 in a guest or a test subprocess on a host.

    PID 1 may start without stdin/stdout/stderr and without PATH; the pipes the agent creates must not land
    on fds 0-2, and bash and the worker need a usable environment and working directory.
    """
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    os.environ.setdefault("PATH", DEFAULT_PATH)
    os.environ.setdefault("LANG", "C.UTF-8")
    os.environ.setdefault("MPLBACKEND", "Agg")
    if os.path.isdir(DATA_DIR):
        os.chdir(DATA_DIR)


def find_virtio_ports(prefix: str, sysfs: str = "/sys/class/virtio-ports", dev: str = "/dev") -> dict[str, str]:
    """{port name: device node} for the virtio-serial ports whose name starts with prefix.

    udev would create /dev/virtio-ports/<name>, but the guest runs no udev: sysfs publishes each port's
    (vportNpM) name too.
    """
    found: dict[str, str] = {}
    try:
        ports = os.listdir(sysfs)
    except OSError:
        ports = []
    for port in sorted(ports):
        try:
            with open(f"{sysfs}/{port}/name", encoding="utf-8") as handle:
                name = handle.read().strip()
        except OSError:
            continue
        if name.startswith(prefix) and os.path.exists(f"{dev}/{port}"):
            found[name] = f"{dev}/{port}"
    links = f"{dev}/virtio-ports"
    with contextlib.suppress(OSError):
        for name in os.listdir(links):
            if name.startswith(prefix):
                found.setdefault(name, f"{links}/{name}")
    return found


def reseed_kernel(seed: bytes) -> str:
    """Mix seed into the kernel RNG and force a CRNG reseed; returns what was done.

    RNDADDENTROPY/RNDRESEEDCRNG need CAP_SYS_ADMIN; without it a plain write still mixes the bytes into
    the pool (without crediting entropy), which is the best an unprivileged process can do.
    """
    try:
        fd = os.open("/dev/urandom", os.O_WRONLY | os.O_CLOEXEC)
    except OSError as exc:
        return f"no /dev/urandom: {exc}"
    try:
        try:
            fcntl.ioctl(fd, RNDADDENTROPY, struct.pack("ii", len(seed) * 8, len(seed)) + seed)
            fcntl.ioctl(fd, RNDRESEEDCRNG)
            return "ioctl"
        except OSError:
            try:
                os.write(fd, seed)
                return "write"
            except OSError as exc:
                return f"failed: {exc}"
    finally:
        os.close(fd)


def set_clock(unix_ns: int) -> None:
    """Set CLOCK_REALTIME; raises OSError (EPERM without CAP_SYS_TIME)."""
    time.clock_settime_ns(time.CLOCK_REALTIME, unix_ns)


def prctl(option: int, arg: int) -> bool:
    """prctl(2) through ctypes, imported only when asked for (it costs startup time in the worker)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(option, arg, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def become_subreaper() -> bool:
    """Adopt orphaned descendants as PID 1 would (used on a host, where the agent is not PID 1)."""
    return prctl(PR_SET_CHILD_SUBREAPER, 1)


def bytes_available(fd: int) -> int:
    """Bytes waiting in a pipe right now (FIONREAD)."""
    try:
        return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
    except OSError:
        return 0


def set_pipe_size(fd: int, size: int) -> None:
    """Enlarge a pipe so that bulk output needs fewer wake-ups; the limit may refuse, which is harmless."""
    with contextlib.suppress(OSError, AttributeError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)


def describe_status(status: int) -> str:
    """'exited with code 3' or 'was killed by signal SIGSEGV (11)' for a waitpid status."""
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        return f"was killed by signal {signal_name(number)} ({number})"
    return f"exited with code {os.waitstatus_to_exitcode(status)}"


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def kill_group(pid: int, sig: int = signal.SIGKILL) -> None:
    """Signal a process group whose leader is pid; a group that is already gone is fine."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def signal_process(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def is_pid1() -> bool:
    return os.getpid() == 1


def python_executable() -> str:
    return sys.executable or "/usr/bin/python3"
