"""The VMM launcher's protocol, its request checks (pure) and its client.

Jailing a VM (bubblewrap, setpriv to the VM user, cgroups) and giving it a network (namespaces, nftables) need
root; the API should not be root. So a deployed node runs a small root daemon, the launcher (service/launcher.py),
and the API, as an unprivileged user, asks it over a unix socket to start a VM, stop one, or attach a network.
Everything else (QMP, the agent, snapshots) the API does itself through the VM's group-accessible sockets.

The launcher trusts nothing in a request: a started VM may only read image files from the configured image
directories and write below the configured run root, and QEMU is always the system's. One JSON object per line
each way; an answer is {"ok": true, ...} or {"ok": false, "error": "..."}.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .errors import EngineError
from .machine import QEMU_BINARY, MachineConfig, machine_from_json, machine_to_json

LAUNCHER_FILE = "launcher"  # in a VM dir the launcher started: its socket path (so any process can stop the VM)
MAX_REQUEST = 1 << 20
_VM_ID_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-")


class LauncherError(EngineError):
    pass


@dataclass(frozen=True)
class LauncherScope:
    """What the launcher lets clients touch (from the spec): VMs under run_root, images from image_roots."""

    run_root: Path
    image_roots: tuple[Path, ...]


def _within(path: Path, root: Path) -> bool:
    resolved, base = Path(os.path.realpath(path)), Path(os.path.realpath(root))
    return resolved == base or base in resolved.parents


def check_start(request: dict[str, Any], scope: LauncherScope) -> tuple[MachineConfig, Path, str | None, str | None]:
    """(machine, run_dir, incoming, vm_id) from a start request, or LauncherError saying what is refused."""
    try:
        machine = machine_from_json(request["machine"])
        run_dir = Path(request["run_dir"])
    except (KeyError, TypeError, ValueError) as exc:
        raise LauncherError(f"malformed start request: {exc}") from None
    machine = replace(machine, qemu_binary=QEMU_BINARY)  # never a client's choice of program
    for name in ("kernel", "initrd", "rootfs"):
        path = getattr(machine, name)
        if not any(_within(path, root) for root in scope.image_roots):
            raise LauncherError(f"{name} {path} is outside the image directories this launcher serves")
    if machine.memory_file is not None and not _within(machine.memory_file, scope.run_root):
        raise LauncherError(f"memory file {machine.memory_file} is outside the run root {scope.run_root}")
    if not _within(run_dir, scope.run_root) or not run_dir.is_dir():
        raise LauncherError(f"run directory {run_dir} is not a directory under the run root {scope.run_root}")
    incoming, vm_id = request.get("incoming"), request.get("vm_id")
    if incoming not in (None, "defer"):
        raise LauncherError("incoming must be null or 'defer' (state comes over QMP from the client)")
    if vm_id is not None and (not isinstance(vm_id, str) or not vm_id or set(vm_id) - _VM_ID_CHARS
                              or len(vm_id) > 40):
        raise LauncherError("vm_id must be 1-40 characters of a-z, 0-9 and '-'")
    return machine, run_dir, incoming, vm_id


def check_vm_dir(value: Any, scope: LauncherScope) -> Path:
    if not isinstance(value, str):
        raise LauncherError("vm_dir must be a path")
    vm_dir = Path(value)
    if not vm_dir.name.startswith("vm-") or not _within(vm_dir, scope.run_root) or vm_dir.is_symlink():
        raise LauncherError(f"{vm_dir} is not a VM directory under the run root {scope.run_root}")
    return vm_dir


@dataclass(frozen=True)
class RemoteIdentity:
    uid: int
    gid: int


class LauncherClient:
    """Stands in for a Jail in an unprivileged process: VirtualMachine.start/stop and network.attach delegate."""

    def __init__(self, socket_path: Path, timeout_s: float = 120.0) -> None:
        self.socket_path = socket_path
        self.timeout_s = timeout_s
        self._identity: RemoteIdentity | None = None

    @property
    def identity(self) -> RemoteIdentity:
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
                while not data.endswith(b"\n"):
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
        if not answer.get("ok"):
            raise LauncherError(f"the VMM launcher refused {op}: {answer.get('error', 'no reason given')}")
        return answer

    def start(self, machine: MachineConfig, run_dir: Path, incoming: str | None, vm_id: str | None) -> tuple[Path, int]:
        answer = self.request("start", machine=machine_to_json(machine), run_dir=str(run_dir), incoming=incoming,
                              vm_id=vm_id)
        return Path(answer["vm_dir"]), int(answer["pid"])

    def stop(self, vm_dir: Path, keep_files: bool) -> None:
        self.request("stop", vm_dir=str(vm_dir), keep_files=keep_files)

    def attach_network(self, vm_dir: Path, resolved: dict[str, Any]) -> dict[str, Any]:
        """The host half of a network (the launcher's own address range); `resolved`: ResolvedPolicy.to_json()."""
        return self.request("attach_network", vm_dir=str(vm_dir), resolved=resolved)


def launcher_of(vm_dir: Path) -> LauncherClient | None:
    """The launcher that started this VM, if one did and this process cannot manage the VM itself."""
    if os.geteuid() == 0:
        return None
    try:
        return LauncherClient(Path((vm_dir / LAUNCHER_FILE).read_text().strip()))
    except OSError:
        return None
