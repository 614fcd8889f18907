"""One QEMU process and the files it owns on the host. Whatever happens, stop() leaves nothing behind."""

from __future__ import annotations

import base64
import contextlib
import ctypes
import json
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from qemu.qmp.legacy import QEMUMonitorProtocol

from . import dirfd, network
from . import jail as jails
from .errors import BootFailed
from .machine import CONSOLE_ID, CONSOLE_RING_BYTES, MachineConfig, RuntimePaths, build_qemu_command

_PR_SET_PDEATHSIG = 1
# The whole environment of every program the engine starts (QEMU, the jail's tools, zstd): nothing of the
# service's own, whose API keys a VMM escape would otherwise hand over.
CHILD_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
_UNIX_PATH_MAX = 108
REPORT_TAIL_CHARS = 2000  # of each log in a failure report
_LOG_TAIL_BYTES = 8192  # read from the end of qemu.log: never the whole file, whatever its size


def _qmp_once(path: Path, command: str, arguments: dict[str, object], timeout: float = 5.0) -> object:
    """One QMP command on a connection of its own, every step under `timeout` (a failure report must not hang
    on a QEMU that is busy or serving another client) and every reply line bounded."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        replies = sock.makefile("rb")
        json.loads(replies.readline(4096))  # the greeting
        reply: dict[str, object] = {}
        for message in ({"execute": "qmp_capabilities"}, {"execute": command, "arguments": arguments}):
            sock.sendall(json.dumps(message).encode() + b"\n")
            reply = {}
            while "return" not in reply and "error" not in reply:  # events may come first
                reply = json.loads(replies.readline(1 << 18))
        if "error" in reply:
            raise ValueError(f"QMP {command}: {reply['error']}")
        return reply["return"]


def _file_tail(path: Path) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(max(0, handle.seek(0, os.SEEK_END) - _LOG_TAIL_BYTES))
            return handle.read(_LOG_TAIL_BYTES).decode(errors="replace")
    except OSError:
        return ""


def _die_with_parent() -> None:  # runs in the child between fork and exec
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class VirtualMachine:
    """A QEMU process. Either started here (we hold its Popen) or attached by PID from another process:
    API workers come and go while the VMs they serve keep running."""

    def __init__(
        self,
        config: MachineConfig,
        vm_dir: Path,
        pid: int,
        process: subprocess.Popen[bytes] | None = None,
        incoming: str | None = None,
    ) -> None:
        self.config = config
        self.dir = vm_dir
        self.process = process
        self._pid = pid
        self.paths = RuntimePaths(vm_dir, incoming=incoming)
        self._qmp: QEMUMonitorProtocol | None = None

    @classmethod
    def attach(cls, config: MachineConfig, vm_dir: Path) -> VirtualMachine:
        """A VM another process started, found by its directory (which holds its pidfile)."""
        return cls(config, vm_dir, int((vm_dir / "qemu.pid").read_text()))

    @classmethod
    def for_dir(cls, vm_dir: Path) -> VirtualMachine:
        """A handle to manage (QMP, stop) a VM whose machine this process does not know: the launcher's view."""
        try:
            pid = int((vm_dir / "qemu.pid").read_text())
        except (OSError, ValueError):
            pid = -1  # never started or already gone: stop() then only cleans up
        return cls(None, vm_dir, pid)  # type: ignore[arg-type]

    @staticmethod
    def dir_path(run_dir: Path, vm_id: str | None) -> Path:
        """Where a VM's own directory goes (sockets, logs, pidfile): vm-<id> below run_dir."""
        vm_dir = run_dir / f"vm-{vm_id or secrets.token_hex(6)}"
        if len(str(vm_dir / "agent-00.sock")) >= _UNIX_PATH_MAX:
            raise OSError(f"run directory {run_dir} is too deep: socket paths must stay under {_UNIX_PATH_MAX} bytes")
        return vm_dir

    @classmethod
    def new_dir(cls, run_dir: Path, vm_id: str | None) -> Path:
        """A VM's own directory, created here (it must not exist)."""
        vm_dir = cls.dir_path(run_dir, vm_id)
        vm_dir.mkdir(parents=True, exist_ok=False)
        return vm_dir

    @classmethod
    def start_direct(
        cls,
        config: MachineConfig,
        run_dir: Path,
        incoming: str | None = None,
        die_with_parent: bool = False,
        detach: bool = False,
        vm_id: str | None = None,
    ) -> VirtualMachine:
        """Spawn QEMU as this process's user (launch.DirectLauncher). `die_with_parent` ties the VM to this
        process (CLI use); `detach` makes it independent of this process (service use): QEMU daemonizes once its
        sockets exist."""
        if die_with_parent and detach:
            raise ValueError("a VM cannot both die with its parent and be detached from it")
        vm_dir = cls.new_dir(run_dir, vm_id)
        paths = RuntimePaths(vm_dir, incoming=incoming, daemonize=detach)
        argv = build_qemu_command(config, paths)
        log = open(vm_dir / "qemu.log", "wb")  # noqa: SIM115 - handed to the child
        try:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent if die_with_parent else None,
                close_fds=True,
                env=CHILD_ENV,
            )
        except OSError as exc:
            shutil.rmtree(vm_dir, ignore_errors=True)
            raise OSError(f"cannot start {config.qemu_binary}: {exc.strerror}") from exc
        finally:
            log.close()
        if not detach:
            paths.pidfile.write_text(str(process.pid))
            return cls(config, vm_dir, process.pid, process, incoming)
        try:
            code = process.wait(timeout=60)
            pid = int(paths.pidfile.read_text()) if code == 0 else None
        except (subprocess.TimeoutExpired, OSError, ValueError):
            process.kill()
            process.wait()
            pid = None
        if pid is None:
            vm = cls(config, vm_dir, process.pid, process, incoming)
            report = vm.failure_report()
            vm.stop()
            raise OSError(f"QEMU did not start: {report}")
        return cls(config, vm_dir, pid, None, incoming)

    @classmethod
    def start_jailed(
        cls, config: MachineConfig, run_dir: Path, jail: jails.Jail, incoming: str | None = None,
        die_with_parent: bool = False, detach: bool = False, vm_id: str | None = None,
    ) -> VirtualMachine:
        """QEMU inside the jail (launch.JailedLauncher), in the foreground as PID 1 of its own PID namespace (so no
        -daemonize: its parent would be the namespace's init). bwrap reports QEMU's host PID on an info pipe; that
        PID is the pidfile. Detached, the jail forks off (setsid -f) so init, not this process, is its parent."""
        if die_with_parent and detach:
            raise ValueError("a VM cannot both die with its parent and be detached from it")
        # Every file operation as root below is relative to the VM dir's descriptor, made here, with no-follow and
        # exclusive create: whoever else can write the run dir or the VM dir cannot redirect one (dirfd.py).
        vm_dir = cls.dir_path(run_dir, vm_id)
        run_dir.mkdir(parents=True, exist_ok=True)  # the run dir is this process's (or the launcher's own)
        run_fd = dirfd.open_dir(run_dir)
        try:
            vm_fd = dirfd.make_dir(run_fd, vm_dir.name, 0, jail.identity.gid, 0o3770)
        finally:
            os.close(run_fd)
        paths = RuntimePaths(vm_dir, incoming=incoming, seccomp=True)
        info_read, info_write = os.pipe()
        process: subprocess.Popen[bytes] | None = None
        pid: int | None = None
        binds: dict[Path, int] = {}
        try:
            procs, binds = jail.prepare(config, vm_dir, vm_fd)
            argv = jails.jail_argv(build_qemu_command(config, paths), config, vm_dir, jail.identity, jail.policy,
                                   info_write, procs, die_with_parent=die_with_parent, detach=detach, fds=binds)
            log = dirfd.create_file(vm_fd, "qemu.log", 0o640)
            try:
                process = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                    preexec_fn=_die_with_parent if die_with_parent else None, close_fds=True,
                    pass_fds=(info_write, *binds.values()), env=CHILD_ENV,
                    umask=0o007,  # sockets and logs group-accessible: service processes in the VM group connect
                )
            finally:
                os.close(log)
            os.close(info_write)
            info_write = -1
            pid = _read_child_pid(info_read, deadline=time.monotonic() + 30)
            if pid is not None:
                dirfd.write_new(vm_fd, "qemu.pid", str(pid))
                vm = cls(config, vm_dir, pid, None if detach else process, incoming)
                if _wait_for_sockets(vm, paths, deadline=time.monotonic() + 60):
                    if detach:
                        process.wait()  # setsid -f returns at once; the jail lives on under init
                    return vm
            report = cls(config, vm_dir, pid or process.pid, process, incoming).failure_report()
        except OSError as exc:
            report = f"cannot start the jailed {config.qemu_binary}: {exc}"
        finally:
            os.close(info_read)
            if info_write >= 0:
                os.close(info_write)
            for fd in (vm_fd, *binds.values()):
                os.close(fd)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if process is not None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait()
        jails.remove_vm_cgroups(vm_dir)
        shutil.rmtree(vm_dir, ignore_errors=True)
        raise BootFailed(f"QEMU did not start in its jail: {report}")

    @property
    def pid(self) -> int:
        return self._pid

    def exited(self) -> int | None:
        """None while running; an exit code (or -1 when not our child and gone) once it stopped."""
        if self.process is not None:
            return self.process.poll()
        return None if self._is_ours_and_alive() else -1

    def _is_ours_and_alive(self) -> bool:
        """The PID is alive and still this VM's QEMU (PIDs get reused), judged by its command line."""
        try:
            cmdline = Path(f"/proc/{self._pid}/cmdline").read_bytes()
            stat = Path(f"/proc/{self._pid}/stat").read_text()
        except OSError:
            return False
        state = stat.rsplit(")", 1)[1].split()[0]
        return state != "Z" and str(self.dir).encode() in cmdline

    def qmp(self, timeout: float = 5.0) -> QEMUMonitorProtocol:
        if self._qmp is None:
            deadline = time.monotonic() + timeout
            while not self.paths.qmp_socket.exists():
                if time.monotonic() > deadline or self.exited() is not None:
                    raise TimeoutError("QEMU's QMP socket did not appear")
                time.sleep(0.002)
            while True:
                monitor = QEMUMonitorProtocol(str(self.paths.qmp_socket))
                try:
                    monitor.connect()
                    break
                except Exception:
                    # QEMU binds the socket (it appears) before it listens: a connect in between is refused. On a
                    # busy host that gap is long enough to hit (found under load: a create answered 500).
                    with contextlib.suppress(Exception):
                        monitor.close()
                    if time.monotonic() > deadline or self.exited() is not None:
                        raise
                    time.sleep(0.01)
            self._qmp = monitor
        return self._qmp

    def failure_report(self) -> str:
        """The host's OOM kill if there was one, then the last useful lines QEMU and the guest console printed.
        Bounded whatever the guest did: the tail of QEMU's log and of the console ring, never more."""
        oom = jails.oom_report(self.dir)
        lines: list[str] = [oom] if oom else []
        for name, text in (("qemu.log", _file_tail(self.dir / "qemu.log")), ("console", self.console_tail())):
            text = text.strip()
            if text:
                lines.append(f"{name}: " + " | ".join(text.splitlines()[-3:])[-REPORT_TAIL_CHARS:])
        return "; ".join(lines) or "no output from QEMU or the guest console"

    def console_tail(self) -> str:
        """What the guest console's ring holds (at most CONSOLE_RING_BYTES), while QEMU lives: the ring is in
        its memory (machine.py says why), so a QEMU that has exited took its console with it. Reading empties
        the ring (QMP ringbuf-read consumes): a failure report reads it once."""
        if self.exited() is not None:
            return ""
        self.close_monitor()  # QEMU greets one QMP client at a time; the next qmp() call connects again
        try:
            data = _qmp_once(self.paths.qmp_socket, "ringbuf-read",
                             {"device": CONSOLE_ID, "size": CONSOLE_RING_BYTES, "format": "base64"})
            return base64.b64decode(data)[-CONSOLE_RING_BYTES:].decode(errors="replace")
        except (OSError, ValueError, KeyError, TypeError):  # best effort: the VM may be going away right now
            return ""

    def close_monitor(self) -> None:
        """Drop our QMP connection (the VM keeps running; QEMU accepts the next one)."""
        if self._qmp is not None:
            with contextlib.suppress(Exception):
                self._qmp.close()
            self._qmp = None

    def stop(self, keep_files: bool = False) -> None:
        """Kill QEMU (it holds nothing we need to flush: the root disk is read-only) and remove its files."""
        self.close_monitor()
        from .launch import launcher_of  # launch.py builds VirtualMachines: imported here, not at the top

        remote = launcher_of(self.dir) if self.process is None else None
        if remote is not None:  # started by the root launcher: only it may kill the VM user's process
            remote.stop(self.dir, keep_files)
            return
        if self.process is not None:
            # Jailed: our child is the launcher; while it lives, QEMU's PID is its child and cannot be reused.
            if self.process.pid != self._pid and self.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self._pid, signal.SIGKILL)
            if self.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()
        elif self._is_ours_and_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while self._is_ours_and_alive() and time.monotonic() < deadline:
                time.sleep(0.005)
        jails.remove_vm_cgroups(self.dir)
        network.detach(self.dir)
        if not keep_files:
            shutil.rmtree(self.dir, ignore_errors=True)


def _read_child_pid(fd: int, deadline: float) -> int | None:
    """QEMU's host PID from bwrap's --info-fd JSON; None if the launcher failed before reporting it."""
    data = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
        with contextlib.suppress(ValueError):
            return int(json.loads(data)["child-pid"])
    return None


def _wait_for_sockets(vm: VirtualMachine, paths: RuntimePaths, deadline: float) -> bool:
    """What -daemonize gave us for free: return only once QEMU's sockets exist (other processes connect to them)."""
    wanted = [paths.qmp_socket] + [paths.agent_socket(port) for port in range(vm.config.agent_ports)]
    while not all(path.exists() for path in wanted):
        # Liveness by state, not command line: the PID execs twice (bwrap -> setpriv -> QEMU), and its cmdline
        # reads empty for a moment during each exec.
        try:
            state = Path(f"/proc/{vm.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        if time.monotonic() > deadline or state == "Z":
            return False
        time.sleep(0.002)
    return True
