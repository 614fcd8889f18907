"""Freezing a sandbox to disk and resuming it; forking it into n live copies.

A snapshot is a directory: `state` (QEMU's full migration stream: RAM and device state, optionally zstd) and
`snapshot.json` (what it needs to be restorable: QEMU version, the machine, the guest image's id). It is written
as `<dir>.partial` and renamed into place only when complete, so a crash mid-freeze leaves the previous snapshot
(or none), never a half-written one that looks complete. A failed freeze resumes the VM.

Fork: the source is paused only while its full state streams to a file; a short-lived "materializer" VM loads
that stream into a new shared RAM file and saves its device state next to it. That pair is a template
(template.py): the n clones map the RAM file copy-on-write, so n copies cost little more than one.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any

from .errors import EngineError
from .launch import VmmLauncher
from .machine import MachineConfig, machine_from_json, machine_to_json
from .sandbox import ExecLimits, Sandbox
from .template import STATE_FILE as TEMPLATE_STATE
from .template import Template, pass_fd, pass_file, restore, save_device_state, wait_migration
from .vm import VirtualMachine

SNAPSHOT_FORMAT = 1
STATE, META = "state", "snapshot.json"
_BANDWIDTH = 8 << 30


class SnapshotError(EngineError):
    pass


class SnapshotMismatch(SnapshotError):
    """The snapshot was made by another QEMU, for another machine or image: restoring it is refused."""


@cache
def qemu_version(binary: str = "qemu-system-x86_64") -> str:
    output = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout
    return output.splitlines()[0].strip()


@dataclass(frozen=True)
class Snapshot:
    directory: Path
    meta: dict[str, Any]

    @classmethod
    def load(cls, directory: Path) -> Snapshot:
        try:
            meta = json.loads((directory / META).read_text())
        except (OSError, ValueError) as exc:
            raise SnapshotError(f"no complete snapshot at {directory}: {exc}") from None
        if not (directory / STATE).is_file():
            raise SnapshotError(f"snapshot {directory} has no state file")
        return cls(directory, meta)

    @property
    def machine(self) -> MachineConfig:
        return machine_from_json(self.meta["machine"])

    @property
    def size_bytes(self) -> int:
        return (self.directory / STATE).stat().st_size

    def check_restorable(self, image_id: str) -> None:
        """Refuse, with the reason, a snapshot this host cannot restore faithfully."""
        if self.meta.get("format") != SNAPSHOT_FORMAT:
            raise SnapshotMismatch(f"snapshot format {self.meta.get('format')} is not {SNAPSHOT_FORMAT}")
        machine = self.machine
        here = qemu_version(machine.qemu_binary)
        if self.meta.get("qemu_version") != here:
            raise SnapshotMismatch(f"snapshot made by {self.meta.get('qemu_version')!r}, this host has {here!r}")
        if self.meta.get("image_id") != image_id:
            raise SnapshotMismatch(
                f"snapshot made on guest image {self.meta.get('image_id')}, the installed image is {image_id}"
            )
        for path in (machine.kernel, machine.initrd, machine.rootfs):
            if not path.is_file():
                raise SnapshotMismatch(f"snapshot needs {path}, which is gone")


def freeze(sandbox: Sandbox, directory: Path, image_id: str, compress: bool = False,
           fail_after_stream: Callable[[], None] | None = None) -> Snapshot:
    """Write the sandbox's full state to `directory` and stop its VM. If anything fails, the VM keeps running
    and `directory` is untouched. `fail_after_stream` is a test hook to inject a failure at the worst moment."""
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    vm = sandbox.vm
    machine = replace(vm.config, memory_file=None, memory_shared=True)  # a resumed VM gets its own RAM
    try:
        with sandbox.exclusive():
            _stream_full_state(vm, partial / STATE, compress)
        meta = {
            "format": SNAPSHOT_FORMAT,
            "qemu_version": qemu_version(vm.config.qemu_binary),
            "machine": machine_to_json(machine),
            "image_id": image_id,
            "compressed": compress,
            "created_at": time.time(),
        }
        (partial / META).write_text(json.dumps(meta, indent=2))
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
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        with contextlib.suppress(Exception):
            vm.qmp().cmd("cont")  # a failed freeze leaves the sandbox running
        raise
    sandbox.close()
    return Snapshot(directory, meta)


def resume(snapshot: Snapshot, run_dir: Path, limits: ExecLimits, image_id: str, launcher: VmmLauncher,
           timeout_s: float = 60.0, vm_id: str | None = None, detach: bool = False) -> Sandbox:
    """A running sandbox from a snapshot, reseeded and with the clock set. The snapshot stays until deleted."""
    snapshot.check_restorable(image_id)
    reader = ["zstd", "-dc", str(snapshot.directory / STATE)] if snapshot.meta.get("compressed") else None
    return restore(snapshot.machine, snapshot.directory / STATE, run_dir, limits, timeout_s, launcher, vm_id=vm_id,
                   detach=detach, reader=reader, ignore_shared=False)


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
    stream = templates_dir / f"fork-{sandbox.vm.dir.name}.stream"
    templates_dir.mkdir(parents=True, exist_ok=True)
    template: Template | None = None
    clones: list[Sandbox] = []
    try:
        with sandbox.exclusive():
            try:
                _stream_full_state(sandbox.vm, stream, compress=False)
            finally:
                with contextlib.suppress(Exception):
                    sandbox.vm.qmp().cmd("cont")
        template = _materialize(sandbox.vm.config, stream, templates_dir, run_dir, timeout_s, launcher)
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
        if template is not None:
            template.remove()
        raise
    finally:
        stream.unlink(missing_ok=True)
    return template, clones


def _materialize(source: MachineConfig, stream: Path, templates_dir: Path, run_dir: Path,
                 timeout_s: float, launcher: VmmLauncher) -> Template:
    """Load a full state stream into a new shared RAM file and save the device state beside it."""
    directory = templates_dir / f"tpl-{secrets.token_hex(6)}"
    directory.mkdir()
    shared = replace(source, memory_file=directory / "memory", memory_shared=True)
    vm = launcher.start(shared, run_dir, incoming="defer")
    try:
        try:
            qmp = vm.qmp()
        except TimeoutError:
            raise SnapshotError(f"the fork's materializer VM did not start: {vm.failure_report()}") from None
        qmp.cmd("migrate-incoming", uri=pass_file(qmp, stream, "state-in"))
        deadline = time.monotonic() + timeout_s
        while qmp.cmd("query-status")["status"] in {"inmigrate", "prelaunch"}:
            if time.monotonic() > deadline or vm.exited() is not None:
                raise SnapshotError(f"loading the fork's state did not finish: {vm.failure_report()}")
            time.sleep(0.005)
        save_device_state(vm, directory / TEMPLATE_STATE)
        clone_machine = replace(shared, memory_shared=False)
        (directory / "template.json").write_text(json.dumps(machine_to_json(clone_machine), indent=2))
    except BaseException:
        vm.stop()
        shutil.rmtree(directory, ignore_errors=True)
        raise
    vm.stop()
    return Template(directory, clone_machine)


def _stream_full_state(vm: VirtualMachine, target: Path, compress: bool) -> None:
    """Pause the VM and write RAM + device state to `target`. The VM stays paused (caller resumes or stops)."""
    qmp = vm.qmp()
    qmp.cmd("stop")
    qmp.cmd("migrate-set-capabilities", capabilities=[{"capability": "x-ignore-shared", "state": False}])
    qmp.cmd("migrate-set-parameters", **{"max-bandwidth": _BANDWIDTH})
    writing: subprocess.Popen[bytes] | None = None
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        # QEMU writes into a pipe; a process of ours writes the file. Not QEMU itself: tmpfs pages are charged to
        # the writer's memory cgroup, and a jailed QEMU's limit has no room for a copy of its whole RAM (it
        # would be OOM-killed mid-fork, losing the source).
        writer = ["zstd", "-1", "-q", "-T2"] if compress else ["cat"]
        writing = subprocess.Popen(writer, stdin=subprocess.PIPE, stdout=fd)
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
