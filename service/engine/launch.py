"""How a sandbox VM's QEMU is started, and who builds the host half of its network: one protocol, three ways.

    DirectLauncher   QEMU runs as this process's user, unjailed (isolation.jail = "off", or "auto" where a jail
                     cannot be had; development machines)
    JailedLauncher   this process is root and jails QEMU itself (jail.py: bubblewrap, setpriv, cgroups, seccomp)
    RemoteLauncher   this process is not root: the root VMM launcher daemon (service/launcherd.py) starts QEMU
                     jailed and builds networks on request over its unix socket; this process then attaches

The engine picks one when it is made (Engine.launcher); nothing below it asks which one it has. Whoever started a
VM, any process can stop it knowing only its directory: a VM the daemon started has a LAUNCHER_FILE there that
names the daemon's socket (launcher_of), because only root may signal the VM user's process.

The daemon's wire format: one JSON object per line each way; an answer is {"ok": true, ...} or
{"ok": false, "error": "..."}. Its request checks are launch_checks.py.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from . import network
from .errors import LauncherError
from .jail import Jail
from .machine import MachineConfig, machine_to_json
from .netpolicy import ResolvedPolicy, Slot, check_range
from .vm import VirtualMachine

LAUNCHER_FILE = "launcher"  # in a VM dir the daemon started: its socket path (so any process can stop the VM)
MAX_REQUEST = 1 << 20


class VmmLauncher(Protocol):
    name: str

    def start(self, machine: MachineConfig, run_dir: Path, *, incoming: str | None = None,
              die_with_parent: bool = False, detach: bool = False, vm_id: str | None = None) -> VirtualMachine:
        """Start QEMU for `machine` in a new VM directory below `run_dir` (the root daemon: below its own)."""
        ...

    def network_unavailable(self) -> str | None:
        """Why VMs started this way cannot be given a network, or None."""
        ...

    def attach_network_host(self, vm: VirtualMachine, resolved: ResolvedPolicy,
                            settings: network.NetworkSettings) -> network.Attachment:
        """The host half of a sandbox network: namespace, links, filter, and the tap handed to QEMU."""
        ...


class DirectLauncher:
    name = "direct"

    def start(self, machine: MachineConfig, run_dir: Path, *, incoming: str | None = None,
              die_with_parent: bool = False, detach: bool = False, vm_id: str | None = None) -> VirtualMachine:
        return VirtualMachine.start_direct(machine, run_dir, incoming=incoming, die_with_parent=die_with_parent,
                                           detach=detach, vm_id=vm_id)

    def network_unavailable(self) -> str | None:
        return network.unavailable()

    def attach_network_host(self, vm: VirtualMachine, resolved: ResolvedPolicy,
                            settings: network.NetworkSettings) -> network.Attachment:
        return network.attach_host(vm, resolved, settings)


class JailedLauncher(DirectLauncher):
    name = "jailed"

    def __init__(self, jail: Jail) -> None:
        self.jail = jail

    def start(self, machine: MachineConfig, run_dir: Path, *, incoming: str | None = None,
              die_with_parent: bool = False, detach: bool = False, vm_id: str | None = None) -> VirtualMachine:
        return VirtualMachine.start_jailed(machine, run_dir, self.jail, incoming=incoming,
                                           die_with_parent=die_with_parent, detach=detach, vm_id=vm_id)


@dataclass(frozen=True)
class RemoteIdentity:
    uid: int
    gid: int


class RemoteLauncher:
    """The root daemon's client: VMs it starts are always jailed and detached; this process only attaches."""

    name = "remote"

    def __init__(self, socket_path: Path, timeout_s: float = 120.0) -> None:
        self.socket_path = socket_path
        self.timeout_s = timeout_s
        self._identity: RemoteIdentity | None = None

    @property
    def identity(self) -> RemoteIdentity:
        """The VM user the daemon runs QEMU as."""
        if self._identity is None:
            answer = self.request("ping")
            self._identity = RemoteIdentity(answer["uid"], answer["gid"])
        return self._identity

    def request(self, op: str, **args: Any) -> dict[str, Any]:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.settimeout(self.timeout_s)
                conn.connect(str(self.socket_path))
                conn.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
                data = b""
                while not data.endswith(b"\n") and len(data) <= MAX_REQUEST:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
        except OSError as exc:
            raise LauncherError(f"the VMM launcher at {self.socket_path} did not answer: {exc}") from None
        try:
            answer = json.loads(data)
        except ValueError:
            raise LauncherError(f"the VMM launcher closed the connection during {op}") from None
        if not isinstance(answer, dict) or not answer.get("ok"):
            error = answer.get("error", "no reason given") if isinstance(answer, dict) else "a malformed answer"
            raise LauncherError(f"the VMM launcher refused {op}: {error}")
        return answer

    def start(self, machine: MachineConfig, run_dir: Path, *, incoming: str | None = None,
              die_with_parent: bool = False, detach: bool = False, vm_id: str | None = None) -> VirtualMachine:
        # The daemon's VMs are detached whatever the caller asked: they outlive the process that asked. They live
        # in the daemon's own directory, not `run_dir`: a client names a VM by id, never where root writes.
        answer = self.request("start", machine=machine_to_json(machine), incoming=incoming, vm_id=vm_id)
        return VirtualMachine(machine, Path(answer["vm_dir"]), int(answer["pid"]), None, incoming)

    def stop(self, vm_dir: Path, keep_files: bool) -> None:
        self.request("stop", vm_dir=str(vm_dir), keep_files=keep_files)

    def network_unavailable(self) -> str | None:
        return None  # the daemon is root: it says so itself if it cannot

    def attach_network_host(self, vm: VirtualMachine, resolved: ResolvedPolicy,
                            settings: network.NetworkSettings) -> network.Attachment:
        # The daemon's own address range, never one a client names; `settings` are this side's and unused.
        vm.close_monitor()  # QEMU serves one QMP client at a time: the daemon needs it now
        answer = self.request("attach_network", vm_dir=str(vm.dir), resolved=resolved.to_json())
        return network.Attachment(Slot(int(answer["slot"]), check_range(answer["range"])), answer["mac"],
                                  resolved.hosts)


def launcher_of(vm_dir: Path) -> RemoteLauncher | None:
    """The daemon that started this VM, if one did and this process cannot manage the VM itself."""
    if os.geteuid() == 0:
        return None
    try:
        return RemoteLauncher(Path((vm_dir / LAUNCHER_FILE).read_text().strip()))
    except OSError:
        return None
