"""Freezing a sandbox to disk and resuming it; forking it into n live copies.

A snapshot is a directory: `state` (QEMU's full migration stream: RAM and device state, optionally zstd) and
`snapshot.json` (what it needs to be restorable: QEMU's release, the resolved machine type, the accelerator, the
guest image's id; compat_facts). It is written
as `<dir>.partial` and renamed into place only when complete, so a crash mid-freeze leaves the previous snapshot
(or none), never a half-written one that looks complete. A failed freeze resumes the VM.

Fork: the source is paused only while QEMU writes its RAM and devices to a mapped-ram file (mapped_ram.py); the
file and a device file cut from it are a template (template.py): the n clones map the RAM file copy-on-write and
load only the devices, so n copies cost little more than one, and no second QEMU ever loads the whole state.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import secrets
import shutil
import stat
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any

from . import mapped_ram, qemu_probe
from .errors import EngineError
from .launch import VmmLauncher
from .machine import MACHINE_TYPE, QEMU_BINARY, MachineConfig, machine_to_json
from .sandbox import ExecLimits, Sandbox
from .template import MEMORY_FILE as TEMPLATE_MEMORY
from .template import META_FILE as TEMPLATE_META
from .template import STATE_FILE as TEMPLATE_STATE
from .template import (
    Template,
    file_uri,
    give_back_zero_pages,
    pass_fd,
    record_extents,
    restore,
    set_migration,
    wait_migration,
)
from .vm import CHILD_ENV, VirtualMachine

# 3: an uncompressed state is QEMU's mapped-ram file (RAM at fixed offsets, written and read in parallel);
# 2 (and 3 compressed): a plain migration stream, still resumed by loading it.
SNAPSHOT_FORMAT = 3
_READABLE_FORMATS = (2, 3)
STATE, META = "state", "snapshot.json"
_META_MAX = 64 << 10
# What a snapshot decides about the machine it is resumed into: its size, within these bounds. Everything else of
# the QEMU command line (the program, kernel, disk, options) comes from the resuming service's own configuration.
_SHAPE_BOUNDS = {"vcpus": (1, 64), "memory_mib": (64, 262144), "agent_ports": (1, 30)}


class SnapshotError(EngineError):
    pass


class SnapshotMismatch(SnapshotError):
    """The snapshot was made by another QEMU release, machine type, accelerator or guest image: refused."""


class SnapshotTampered(SnapshotError):
    """The snapshot's metadata is malformed or fails authentication: altered, or from another deployment."""


@cache
def qemu_release(binary: str = QEMU_BINARY) -> str:
    """QEMU's major.minor ("10.0"): what migration compatibility follows (a package's security update keeps it)."""
    return _probe(qemu_probe.qemu_version, binary).release


def qemu_version(binary: str = QEMU_BINARY) -> str:
    """The whole version line ("10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)"): recorded for people, not compared."""
    return _probe(qemu_probe.qemu_version, binary).full


def machine_type(binary: str = QEMU_BINARY) -> str:
    """The machine type MACHINE_TYPE resolves to in this QEMU: the versioned one where the name is an alias; microvm
    is unversioned, so its release (qemu_release) stands for the version."""
    return _probe(qemu_probe.machine_type, binary, MACHINE_TYPE)


def _probe(ask: Callable[..., Any], *args: str) -> Any:
    try:
        return ask(*args)
    except qemu_probe.QemuProbeError as exc:
        raise SnapshotError(str(exc)) from None


def compat_facts(machine: MachineConfig) -> dict[str, str]:
    """What a snapshot records and resume compares (decisions §5): QEMU's release, the resolved machine type and
    the accelerator. (The guest image is the engine's, given to freeze and check_restorable.)"""
    return {"qemu_release": qemu_release(machine.qemu_binary), "machine_type": machine_type(machine.qemu_binary),
            "accelerator": machine.accelerator}


def _signature(meta: dict[str, Any], key: bytes) -> str:
    canonical = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(key, b"appliance-snapshot-v2\0" + canonical, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Snapshot:
    directory: Path
    meta: dict[str, Any]

    @classmethod
    def load(cls, directory: Path, key: bytes) -> Snapshot:
        """The snapshot in `directory`, its metadata authenticated with the deployment's key and checked."""
        try:
            with open(directory / META, "rb") as handle:
                data = handle.read(_META_MAX + 1)
            state = os.lstat(directory / STATE)
        except OSError as exc:
            raise SnapshotError(f"no complete snapshot at {directory}: {exc.strerror}") from None
        if len(data) > _META_MAX or not stat.S_ISREG(state.st_mode):
            raise SnapshotTampered(f"snapshot {directory.name} is not one this service wrote")
        try:
            meta = json.loads(data)
            signature = meta.pop("hmac")
        except (ValueError, TypeError, KeyError, AttributeError):
            raise SnapshotTampered(f"snapshot {directory.name} has malformed metadata") from None
        if not isinstance(signature, str) or not hmac.compare_digest(signature, _signature(meta, key)):
            raise SnapshotTampered(f"snapshot {directory.name} fails authentication: its metadata was altered, or "
                                   "it was made by another deployment")
        snapshot = cls(directory, meta)
        snapshot.shape()  # types and bounds, even of a signed file
        return snapshot

    def shape(self) -> dict[str, Any]:
        """vcpus, memory_mib, agent_ports and nic, checked: the only machine facts a snapshot contributes."""
        shape: dict[str, Any] = {}
        for name, (low, high) in _SHAPE_BOUNDS.items():
            value = self.meta.get(name)
            if type(value) is not int or not low <= value <= high:
                raise SnapshotTampered(f"snapshot {self.directory.name}: {name} {value!r} is out of bounds")
            shape[name] = value
        if type(self.meta.get("nic")) is not bool or type(self.meta.get("compressed")) is not bool:
            raise SnapshotTampered(f"snapshot {self.directory.name}: nic and compressed must be booleans")
        shape["nic"] = self.meta["nic"]
        return shape

    @property
    def mapped(self) -> bool:
        """The state is a mapped-ram file (format 3, uncompressed), not a plain stream."""
        return self.meta.get("format") == 3 and not self.meta["compressed"]

    @property
    def size_bytes(self) -> int:
        """What the snapshot takes on disk (a mapped-ram file is sparse: its size is the guest's RAM)."""
        return (self.directory / STATE).stat().st_blocks * 512

    def check_restorable(self, machine: MachineConfig, image_id: str) -> None:
        """Refuse, with the reason, a snapshot that `machine` on this host cannot restore faithfully. The QEMU
        package's own version ("qemu_version") is not compared: a security update of the same release loads."""
        if self.meta.get("format") not in _READABLE_FORMATS:
            raise SnapshotMismatch(f"snapshot format {self.meta.get('format')!r} is not one of {_READABLE_FORMATS}")
        here = {**compat_facts(machine), "image_id": image_id}
        words = {"qemu_release": "QEMU release", "machine_type": "machine type", "accelerator": "accelerator",
                 "image_id": "guest image"}
        for name, what in words.items():
            if self.meta.get(name) != here[name]:
                made = f" (QEMU {self.meta['qemu_version']})" if isinstance(self.meta.get("qemu_version"), str) else ""
                raise SnapshotMismatch(f"snapshot made with {what} {self.meta.get(name)!r}{made}; this host has "
                                       f"{here[name]!r} (QEMU {qemu_version(machine.qemu_binary)})")


def freeze(sandbox: Sandbox, directory: Path, image_id: str, key: bytes, compress: bool = False,
           fail_after_stream: Callable[[], None] | None = None) -> Snapshot:
    """Write the sandbox's full state to `directory` and stop its VM. If anything fails, the VM keeps running
    and `directory` is untouched. `fail_after_stream` is a test hook to inject a failure at the worst moment."""
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(mode=0o700, parents=True)
    vm = sandbox.vm
    try:
        with sandbox.exclusive():
            if compress:
                _stream_full_state(vm, partial / STATE, compress)
            else:  # QEMU writes the file itself, RAM in parallel at fixed offsets (no pipe, no copy)
                save_mapped(vm, partial / STATE)
            _fsync_path(partial / STATE)
        meta = {
            "format": SNAPSHOT_FORMAT,
            **compat_facts(vm.config),
            "qemu_version": qemu_version(vm.config.qemu_binary),
            "image_id": image_id,
            "vcpus": vm.config.vcpus,
            "memory_mib": vm.config.memory_mib,
            "agent_ports": vm.config.agent_ports,
            "nic": vm.config.nic,
            "compressed": compress,
            "created_at": time.time(),
        }
        _write_synced(partial / META, json.dumps({**meta, "hmac": _signature(meta, key)}, indent=2).encode())
        _fsync_path(partial)
        if fail_after_stream is not None:
            fail_after_stream()
        if directory.exists():
            old = directory.with_name(directory.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            directory.rename(old)
            partial.rename(directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            partial.rename(directory)
        _fsync_path(directory.parent)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        with contextlib.suppress(Exception):
            vm.qmp().cmd("cont")  # a failed freeze leaves the sandbox running
        raise
    sandbox.close()
    return Snapshot(directory, meta)


def _write_synced(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_path(path: Path) -> None:
    """A file's data, or a directory's entries, on disk before the rename that makes the snapshot count."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def resume(snapshot: Snapshot, machine: MachineConfig, run_dir: Path, limits: ExecLimits, image_id: str,
           launcher: VmmLauncher, timeout_s: float = 60.0, vm_id: str | None = None, detach: bool = False) -> Sandbox:
    """A running sandbox from a snapshot, reseeded and with the clock set. `machine` is the resuming engine's own
    (Engine.machine for the snapshot's shape): nothing of the command line comes from the snapshot's files.
    The snapshot stays until deleted."""
    snapshot.check_restorable(machine, image_id)
    state = snapshot.directory / STATE
    if snapshot.mapped:  # read back in parallel (multifd) into fresh RAM, zero pages skipped
        return restore(machine, state, run_dir, limits, timeout_s, launcher, vm_id=vm_id, detach=detach,
                       mode="mapped")
    reader = ["zstd", "-dc", "--", str(state)] if snapshot.meta["compressed"] else None
    return restore(machine, state, run_dir, limits, timeout_s, launcher, vm_id=vm_id, detach=detach, reader=reader,
                   mode="stream")


def capture(sandbox: Sandbox, templates_dir: Path) -> Template:
    """The sandbox's live state as a new template (a fork's, or a named snapshot's); the sandbox keeps running.
    On failure nothing new is left.

    The source, paused, writes its RAM once into a mapped-ram file (QEMU itself, in parallel, zero pages left as
    holes) and resumes; copies map that file copy-on-write and load only its device state (mapped_ram.py)."""
    source = sandbox.vm.config
    directory = templates_dir / f"tpl-{secrets.token_hex(6)}"
    directory.mkdir(parents=True)
    memory = directory / TEMPLATE_MEMORY
    # Written under a name of the source's, then moved into the template: one fork of a source at a time.
    written = templates_dir / f"fork-{sandbox.vm.dir.name}.ram"
    try:
        with sandbox.exclusive():
            try:
                save_mapped(sandbox.vm, written)
            finally:
                with contextlib.suppress(Exception):
                    sandbox.vm.qmp().cmd("cont")
        written.rename(memory)
        layout = mapped_ram.ram_layout(memory, source.memory_mib << 20)
        mapped_ram.write_device_file(memory, directory / TEMPLATE_STATE, layout)
        record_extents(memory)
        if source.memory_file is not None and not source.memory_shared:
            give_back_zero_pages(source.memory_file)  # saving a copy read all it maps: see give_back_zero_pages
        clone_machine = replace(source, memory_file=memory, memory_shared=False, memory_offset=layout.pages_offset)
        (directory / TEMPLATE_META).write_text(json.dumps(machine_to_json(clone_machine), indent=2))
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        with contextlib.suppress(OSError):
            written.unlink(missing_ok=True)
        raise
    return Template(directory, clone_machine)


def fork(
    sandbox: Sandbox,
    n: int,
    templates_dir: Path,
    run_dir: Path,
    limits: ExecLimits,
    launcher: VmmLauncher,
    timeout_s: float = 60.0,
    detach: bool = False,
    vm_ids: list[str] | None = None,
) -> tuple[Template, list[Sandbox]]:
    """n running copies of `sandbox`, which keeps running. Returns the new template (the clones map its RAM
    file; remove it when the last clone is gone) and the clones. On failure nothing new is left behind."""
    if n < 1:
        raise ValueError("fork needs n >= 1")
    template = capture(sandbox, templates_dir)
    clones: list[Sandbox] = []
    try:
        ids = vm_ids or [None] * n
        with ThreadPoolExecutor(max_workers=min(n, 4)) as pool:
            futures = [pool.submit(template.clone, run_dir, limits, launcher, timeout_s, ids[i], detach)
                       for i in range(n)]
            errors = []
            for future in futures:
                try:
                    clones.append(future.result())
                except Exception as exc:  # collected, so every clone that did start is closed below
                    errors.append(exc)
            if errors:
                raise errors[0]
    except BaseException:
        for clone in clones:
            clone.close()
        template.remove()
        raise
    return template, clones


def save_mapped(vm: VirtualMachine, target: Path) -> None:
    """Pause the VM and have QEMU write RAM + device state to `target` in the mapped-ram layout. The VM stays
    paused (the caller resumes or stops it)."""
    qmp = vm.qmp()
    qmp.cmd("stop")
    set_migration(qmp, "mapped")
    with file_uri(qmp, target, write=True) as uri:
        qmp.cmd("migrate", uri=uri)
        wait_migration(qmp, "completed", deadline=time.monotonic() + 300)


def _stream_full_state(vm: VirtualMachine, target: Path, compress: bool) -> None:
    """Pause the VM and write RAM + device state to `target`. The VM stays paused (caller resumes or stops)."""
    qmp = vm.qmp()
    qmp.cmd("stop")
    set_migration(qmp, "stream")
    writing: subprocess.Popen[bytes] | None = None
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        # QEMU writes into a pipe; a process of ours writes the file. Not QEMU itself: tmpfs pages are charged to
        # the writer's memory cgroup, and a jailed QEMU's limit has no room for a copy of its whole RAM (it
        # would be OOM-killed mid-fork, losing the source).
        writer = ["zstd", "-1", "-q", "-T2"] if compress else ["cat"]
        writing = subprocess.Popen(writer, stdin=subprocess.PIPE, stdout=fd, env=CHILD_ENV)
        assert writing.stdin is not None
        uri = pass_fd(qmp, writing.stdin.fileno(), "state-out")
        writing.stdin.close()
    except BaseException:
        _end(writing)
        raise
    finally:
        os.close(fd)
    try:
        qmp.cmd("migrate", uri=uri)
        wait_migration(qmp, "completed", deadline=time.monotonic() + 300)
        if writing is not None and writing.wait(timeout=120) != 0:
            raise SnapshotError(f"{writer[0]} failed writing {target.name} (exit {writing.returncode})")
    finally:
        _end(writing)


def _end(process: subprocess.Popen[bytes] | None) -> None:
    if process is not None and process.poll() is None:
        with contextlib.suppress(OSError):
            process.kill()
        process.wait()
