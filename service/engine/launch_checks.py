"""The VMM launcher daemon's request checks (pure): what an unprivileged client may ask the root launcher
(service/launcherd.py) to do. The daemon trusts nothing in a request: a started VM may only read image files from
the configured image directories and write below the configured run root, and QEMU is always the system's.
The wire protocol and the client are in launch.py (RemoteLauncher).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .errors import LauncherError
from .machine import QEMU_BINARY, MachineConfig, machine_from_json

_VM_ID_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-")


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
