"""The VMM launcher daemon's request checks (pure): what an unprivileged client may ask the root launcher
(service/launcherd.py) to do. The daemon trusts nothing in a request: a started VM may only read image files from
the configured image directories, its directory is one the launcher makes in its own, and QEMU is always the
system's. A client names VMs by id; the only path it sends is a template's memory file below its run root.
The wire protocol and the client are in launch.py (RemoteLauncher).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .errors import LauncherError
from .machine import QEMU_BINARY, MachineConfig, machine_from_json

_VM_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")
MAX_VM_ID = 40
VM_DIR_PREFIX = "vm-"


@dataclass(frozen=True)
class LauncherScope:
    """What the launcher lets clients touch (from the spec): its own VM dirs under vms_dir (root's), images from
    image_roots (root's alone: dirfd.open_root_owned), template memory files below run_root (the client's)."""

    vms_dir: Path
    run_root: Path
    image_roots: tuple[Path, ...]


def _within(resolved: Path, root: Path) -> bool:
    return Path(os.path.realpath(root)) in resolved.parents


def check_vm_id(value: Any) -> str:
    """A client names a VM by id only: 1-40 of a-z, 0-9 and '-' (never a path)."""
    if not isinstance(value, str) or not value or len(value) > MAX_VM_ID or set(value) - _VM_ID_CHARS:
        raise LauncherError(f"vm_id must be 1-{MAX_VM_ID} characters of a-z, 0-9 and '-'")
    return value


def check_start(request: dict[str, Any], scope: LauncherScope) -> tuple[MachineConfig, str | None, str | None]:
    """(machine, incoming, vm_id) from a start request, or LauncherError saying what is refused. The machine's
    image paths come back resolved: the launcher opens exactly those (and refuses them if any link appears)."""
    try:
        machine = machine_from_json(request["machine"])
    except (KeyError, TypeError, ValueError) as exc:
        raise LauncherError(f"malformed start request: {exc}") from None
    machine = replace(machine, qemu_binary=QEMU_BINARY)  # never a client's choice of program
    for name in ("kernel", "initrd", "rootfs"):
        path = getattr(machine, name)
        try:
            resolved = Path(os.path.realpath(path))  # once: what is checked is what is opened (or refused)
        except OSError as exc:  # a link that changed while it was read
            raise LauncherError(f"{name} {path} cannot be resolved: {exc.strerror}") from None
        if not any(_within(resolved, root) for root in scope.image_roots):
            raise LauncherError(f"{name} {path} is outside the image directories this launcher serves")
        machine = replace(machine, **{name: resolved})
    memory = machine.memory_file
    if memory is not None and (not memory.is_absolute() or os.path.normpath(memory) != str(memory)
                               or scope.run_root not in memory.parents):
        raise LauncherError(f"memory file {memory} is not a plain path below the run root {scope.run_root}")
    incoming, vm_id = request.get("incoming"), request.get("vm_id")
    if incoming not in (None, "defer"):
        raise LauncherError("incoming must be null or 'defer' (state comes over QMP from the client)")
    return machine, incoming, None if vm_id is None else check_vm_id(vm_id)


def check_vm_dir(value: Any, scope: LauncherScope) -> Path:
    """A VM dir the launcher made: vms_dir/vm-<id>, named exactly so (the client's string picks only the id)."""
    if not isinstance(value, str):
        raise LauncherError("vm_dir must be a path")
    vm_dir = Path(value)
    if vm_dir.parent != scope.vms_dir or not vm_dir.name.startswith(VM_DIR_PREFIX):
        raise LauncherError(f"{vm_dir} is not a VM directory of this launcher ({scope.vms_dir}/vm-<id>)")
    check_vm_id(vm_dir.name.removeprefix(VM_DIR_PREFIX))
    return scope.vms_dir / vm_dir.name
