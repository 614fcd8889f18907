"""This process's handles to sandbox VMs, and the cross-process locks around them.

Any API worker (and the pool keeper) can serve any sandbox: each VM has several agent ports, and a process takes
one with an flock on a file in the VM's directory and keeps its connection. The code lock (another flock in the
VM dir) keeps execs, forks and freezes of one sandbox from overlapping across processes. Every lock here dies with
the process that holds it, so a crashed worker never leaves a sandbox locked.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from service.engine import Sandbox, SandboxBusy, SandboxLost

from .errors import Busy

CODE_LOCK = "code.lock"


def flock_file(path: Path, blocking: bool) -> int | None:
    """An fd holding an exclusive flock on `path` (created 0600), or None if `blocking` is False and another
    process holds it. Release with os.close()."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def held(path: Path) -> Iterator[None]:
    """Wait for the flock on `path`, hold it for the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = flock_file(path, blocking=True)
    assert fd is not None
    try:
        yield
    finally:
        os.close(fd)


def take_code_lock(vm_dir: Path) -> int:
    """Held while code runs in the sandbox, and by a fork or freeze of it, across every process: Busy if someone
    holds it. Release with os.close()."""
    fd = flock_file(vm_dir / CODE_LOCK, blocking=False)
    if fd is None:
        raise Busy(str(SandboxBusy()))
    return fd


def claim_port(vm_dir: Path, ports: int) -> tuple[int, int]:
    """An agent port no other process holds, and the fd of its lock (kept as long as this process uses the port).
    Port 0 is left to whoever creates or restores the VM."""
    for port in range(1, ports):
        fd = flock_file(vm_dir / f"agent-{port}.lock", blocking=False)
        if fd is not None:
            return port, fd
    raise Busy("every connection to this sandbox is in use by other workers; retry", retry_after=1)


@dataclass
class _Handle:
    sandbox: Sandbox
    vm_dir: Path
    lock_fd: int


# Connects a Sandbox on (vm_dir, port): the engine's connect, with the record's machine bound in.
Connector = Callable[[Path, int], Sandbox]


class Attachments:
    """This process's open connections, one per sandbox id, made once on a free port and then reused."""

    def __init__(self) -> None:
        self._handles: dict[str, _Handle] = {}
        self._lock = threading.Lock()

    def get(self, sandbox_id: str, vm_dir: Path, ports: int, connect: Connector, purpose: str = "") -> Sandbox:
        """`purpose` "commands" is a second connection of this process, for commands (service/commands.py): one
        connection has one reader, and a command call must not wait for an exec that streams on the first."""
        key = f"{sandbox_id}#{purpose}" if purpose else sandbox_id
        with self._lock:
            handle = self._handles.get(key)
            if handle is not None and not handle.sandbox.closed and handle.vm_dir == vm_dir:
                return handle.sandbox
            if handle is not None:  # frozen and resumed by another process since: a new VM in a new directory
                del self._handles[key]
                _release(handle)
            try:
                port, lock_fd = claim_port(vm_dir, ports)
            except FileNotFoundError:  # its directory went with its VM (stopped elsewhere, tmpfs wiped)
                raise SandboxLost(f"the VM of sandbox {sandbox_id} is gone") from None
            try:
                sandbox = connect(vm_dir, port)
            except BaseException:
                os.close(lock_fd)
                raise
            self._handles[key] = _Handle(sandbox, vm_dir, lock_fd)
            return sandbox

    def forget(self, sandbox_id: str) -> None:
        """Drop this process's connection (the VM keeps running for whoever attaches next)."""
        with self._lock:
            handles = [self._handles.pop(key, None) for key in (sandbox_id, f"{sandbox_id}#commands")]
        for handle in handles:
            if handle is not None:
                _release(handle)

    def close(self) -> None:
        for key in list(self._handles):
            self.forget(key.split("#", 1)[0])


def _release(handle: _Handle) -> None:
    handle.sandbox.detach()
    os.close(handle.lock_fd)
