"""One QEMU process and the files it owns on the host. Whatever happens, stop() leaves nothing behind."""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path

from qemu.qmp.legacy import QEMUMonitorProtocol

from .machine import MachineConfig, RuntimePaths, build_qemu_command

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class VirtualMachine:
    def __init__(self, config: MachineConfig, vm_dir: Path, process: subprocess.Popen[bytes], paths: RuntimePaths):
        self.config = config
        self.dir = vm_dir
        self.process = process
        self.paths = paths
        self._qmp: QEMUMonitorProtocol | None = None

    @classmethod
    def start(
        cls,
        config: MachineConfig,
        run_dir: Path,
        incoming: str | None = None,
        die_with_parent: bool = False,
        vm_id: str | None = None,
    ) -> VirtualMachine:
        """Spawn QEMU in its own session. `die_with_parent` ties the VM to this process (CLI use)."""
        vm_dir = run_dir / f"vm-{vm_id or secrets.token_hex(6)}"
        vm_dir.mkdir(parents=True, exist_ok=False)
        paths = RuntimePaths(
            agent_socket=vm_dir / "agent.sock",
            qmp_socket=vm_dir / "qmp.sock",
            console_log=vm_dir / "console.log",
            incoming=incoming,
        )
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
            )
        except OSError as exc:
            shutil.rmtree(vm_dir, ignore_errors=True)
            raise OSError(f"cannot start {config.qemu_binary}: {exc.strerror}") from exc
        finally:
            log.close()
        return cls(config, vm_dir, process, paths)

    @property
    def pid(self) -> int:
        return self.process.pid

    def exited(self) -> int | None:
        return self.process.poll()

    def qmp(self, timeout: float = 5.0) -> QEMUMonitorProtocol:
        if self._qmp is None:
            deadline = time.monotonic() + timeout
            while not self.paths.qmp_socket.exists():
                if time.monotonic() > deadline or self.exited() is not None:
                    raise TimeoutError("QEMU's QMP socket did not appear")
                time.sleep(0.002)
            monitor = QEMUMonitorProtocol(str(self.paths.qmp_socket))
            monitor.connect()
            self._qmp = monitor
        return self._qmp

    def failure_report(self) -> str:
        """The last useful lines QEMU and the guest console printed, for an error message."""
        lines: list[str] = []
        for name in ("qemu.log", "console.log"):
            with contextlib.suppress(OSError):
                text = (self.dir / name).read_text(errors="replace").strip()
                if text:
                    lines.append(f"{name}: " + " | ".join(text.splitlines()[-3:]))
        return "; ".join(lines) or "no output from QEMU or the guest console"

    def stop(self, keep_files: bool = False) -> None:
        """Kill QEMU (it holds nothing we need to flush: the root disk is read-only) and remove its files."""
        if self._qmp is not None:
            with contextlib.suppress(Exception):
                self._qmp.close()
            self._qmp = None
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()
        if not keep_files:
            shutil.rmtree(self.dir, ignore_errors=True)
