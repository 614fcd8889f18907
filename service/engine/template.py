"""Copy-on-write templates: save a warm VM once, start clones of it in ~0.1 s.

A template VM runs with its RAM in a file on tmpfs (share=on). To save it we pause it and migrate with
x-ignore-shared, so only device state (tens of KiB) is written: the RAM is already in the file. A clone maps the
same file privately (share=off): it reads the template's pages and copies only the ones it writes. The memory
file therefore must never change while any clone lives; nothing writes it after the template VM is gone.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import json
import logging
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from . import mapped_ram
from .channel import AgentChannel
from .errors import BootFailed, EngineError
from .launch import VmmLauncher
from .machine import MachineConfig, machine_from_json, machine_to_json
from .sandbox import ExecLimits, Sandbox
from .vm import CHILD_ENV, VirtualMachine

log = logging.getLogger(__name__)
MEMORY_FILE, STATE_FILE, META_FILE, EXTENTS_FILE = "memory", "devstate", "template.json", "extents"
_FALLOC_KEEP_SIZE, _FALLOC_PUNCH_HOLE = 1, 2
# Device state is small, but QEMU's default 32 MiB/s cap throttles even that; RAM never goes through the stream.
_MIGRATE_BANDWIDTH = 8 << 30
_MULTIFD_CHANNELS = 2  # mapped-ram writes/reads RAM in parallel; more threads than cores only contend
_FDSET = 7  # the fd set a file migration's descriptor goes into (emptied after each migration)


class TemplateError(EngineError):
    pass


@dataclass(frozen=True)
class Template:
    directory: Path
    machine: MachineConfig  # the machine clones must be started with (memory_file points into directory)

    @property
    def template_id(self) -> str:
        return self.directory.name

    @classmethod
    def create(
        cls,
        machine: MachineConfig,
        templates_dir: Path,
        limits: ExecLimits,
        boot_timeout_s: float,
        launcher: VmmLauncher,
        warm_code: str = "",
    ) -> Template:
        """Boot, run `warm_code` (e.g. imports), save. On failure nothing is left behind."""
        directory = templates_dir / f"tpl-{secrets.token_hex(6)}"
        directory.mkdir(parents=True)
        shared = replace(machine, memory_file=directory / MEMORY_FILE, memory_shared=True)
        try:
            sandbox = Sandbox.boot(shared, directory, limits, boot_timeout_s, launcher)
            try:
                # Always one exec, even without warm-up code: it waits until the worker is up, so the saved state
                # never holds a worker still starting (its clones would report their first exec as busy).
                result = sandbox.run_code(warm_code or "pass", timeout_s=max(limits.timeout_s, 300.0))
                if result.error is not None:
                    raise TemplateError(f"warm-up code failed in the template: {result.error.get('value')}")
                if shared.nic:  # clones then bind the NIC driver when given a network, instead of loading it
                    prepared = sandbox.call("net_prepare", timeout_s=60)
                    if prepared.get("ev") != "ok":
                        log.warning("template: the NIC driver was not preloaded: %s", prepared.get("message"))
                save_device_state(sandbox.vm, directory / STATE_FILE)
            finally:
                sandbox.close()
            record_extents(directory / MEMORY_FILE)
            clone_machine = replace(shared, memory_shared=False)
            (directory / META_FILE).write_text(json.dumps(machine_to_json(clone_machine), indent=2))
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        return cls(directory, clone_machine)

    @classmethod
    def load(cls, directory: Path) -> Template:
        try:
            machine = machine_from_json(json.loads((directory / META_FILE).read_text()))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise TemplateError(f"template {directory} is incomplete or unreadable: {exc}") from None
        if not (directory / STATE_FILE).is_file() or not (directory / MEMORY_FILE).is_file():
            raise TemplateError(f"template {directory} lacks its memory or device state")
        return cls(directory, machine)

    def clone(
        self, run_dir: Path, limits: ExecLimits, launcher: VmmLauncher, timeout_s: float = 30.0,
        vm_id: str | None = None, detach: bool = False,
    ) -> Sandbox:
        """A running sandbox with the template's state, reseeded and with the clock set."""
        state = self.directory / STATE_FILE
        # A RAM file at an offset is a mapped-ram state (a fork's, snapshot.py): its device file loads mapped-ram.
        mode = "mapped" if self.machine.memory_offset else "shared"
        return restore(self.machine, state, run_dir, limits, timeout_s, launcher, vm_id=vm_id, detach=detach,
                       mode=mode)

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    @property
    def size_bytes(self) -> int:
        """What its files take (the RAM file is sparse: the memory the source had in use)."""
        return sum(path.stat().st_blocks * 512 for path in self.directory.iterdir() if path.is_file())


def record_extents(memory_file: Path) -> None:
    """Note which parts of a finished template's RAM file hold data: the rest (holes) is guest memory never
    written, zero for good, since nothing writes the file again. See give_back_zero_pages."""
    fd = os.open(memory_file, os.O_RDONLY | os.O_CLOEXEC)
    try:
        found = mapped_ram.extents(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)
    (memory_file.parent / EXTENTS_FILE).write_bytes(array.array("Q", [x for pair in found for x in pair]).tobytes())


def give_back_zero_pages(memory_file: Path) -> None:
    """Punch the template's holes out of its RAM file again. A copy that writes a never-written page, or a save
    that reads a copy's whole memory, faults that hole of the file into a tmpfs page (the kernel fills a private
    mapping's page from the file first). Their content is zero either way; a copy mapping them faults them in
    again as zero. A file without an extents record (made before it existed) is left alone."""
    try:
        record = array.array("Q")
        record.frombytes((memory_file.parent / EXTENTS_FILE).read_bytes())
        fd = os.open(memory_file, os.O_WRONLY | os.O_CLOEXEC)
    except (OSError, ValueError):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
        size, hole = os.fstat(fd).st_size, 0
        for begin, end in [*zip(record[::2], record[1::2], strict=True), (size, size)]:
            if begin > hole:
                libc.fallocate(fd, _FALLOC_KEEP_SIZE | _FALLOC_PUNCH_HOLE, hole, begin - hole)
            hole = end
    finally:
        os.close(fd)


def save_device_state(vm: VirtualMachine, state_file: Path) -> None:
    """Pause the VM and write its device state (not its shared RAM) to `state_file`, atomically."""
    qmp = vm.qmp()
    tmp = state_file.with_suffix(".partial")
    qmp.cmd("stop")
    set_migration(qmp, "shared")
    qmp.cmd("migrate", uri=pass_file(qmp, tmp, "state-out"))
    wait_migration(qmp, "completed", deadline=time.monotonic() + 60)
    tmp.replace(state_file)


def set_migration(qmp: Any, mode: str) -> None:
    """Every migration capability this engine uses, set for one migration ("stream": RAM and devices through a
    descriptor; "shared": devices only, RAM is a shared file; "mapped": mapped-ram to a file). All are set each
    time: capabilities outlive a migration, and a VM may be forked (mapped) and then frozen compressed (stream)."""
    caps = {"x-ignore-shared": mode == "shared", "multifd": mode == "mapped", "mapped-ram": mode == "mapped"}
    qmp.cmd("migrate-set-capabilities", capabilities=[{"capability": c, "state": on} for c, on in caps.items()])
    params: dict[str, Any] = {"max-bandwidth": _MIGRATE_BANDWIDTH}
    if mode == "mapped":
        params["multifd-channels"] = _MULTIFD_CHANNELS
    qmp.cmd("migrate-set-parameters", **params)


@contextlib.contextmanager
def file_uri(qmp: Any, path: Path, write: bool) -> Iterator[str]:
    """A `file:` migration URI for `path` that a jailed QEMU can use: it may not open our files, so the
    descriptor goes over QMP into an fd set (mapped-ram's multifd channels each reopen it; `fd:` cannot seek)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC if write else os.O_RDONLY
    fd = os.open(path, flags | os.O_CLOEXEC, 0o600)
    try:
        qmp.send_fd_scm(fd)
        fdset = qmp.cmd("add-fd", **{"fdset-id": _FDSET})["fdset-id"]
    finally:
        os.close(fd)
    try:
        yield f"file:/dev/fdset/{fdset}"
    finally:
        with contextlib.suppress(Exception):  # the set must not keep this file for the next migration
            qmp.cmd("remove-fd", **{"fdset-id": fdset})


def pass_fd(qmp: Any, fd: int, name: str) -> str:
    """Hand QEMU a descriptor we opened (SCM_RIGHTS over QMP) and return the migration URI naming it. Migrations
    go through descriptors, not `exec:`: a jailed QEMU may not spawn processes, nor open our files."""
    qmp.send_fd_scm(fd)
    qmp.cmd("getfd", fdname=name)
    return f"fd:{name}"


def pass_file(qmp: Any, path: Path, name: str) -> str:
    """pass_fd for a state file: "state-in" opens it to read, anything else creates it to write."""
    flags = os.O_RDONLY if name == "state-in" else os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(path, flags | os.O_CLOEXEC, 0o600)
    try:
        return pass_fd(qmp, fd, name)
    finally:
        os.close(fd)


def restore(
    machine: MachineConfig,
    state_file: Path,
    run_dir: Path,
    limits: ExecLimits,
    timeout_s: float,
    launcher: VmmLauncher,
    vm_id: str | None = None,
    detach: bool = False,
    reader: list[str] | None = None,
    mode: str = "shared",
) -> Sandbox:
    """Start a VM from saved state, resume it, reseed it, set its clock.

    `mode` (set_migration): "shared", the state holds only devices and the RAM is `machine.memory_file` (a
    template); "mapped", the state is a mapped-ram device file and the RAM is mapped from `machine.memory_file`
    at its offset; "stream", a full stream loaded into fresh RAM. `reader` is a command (argv) printing a stream,
    e.g. decompressing."""
    deadline = time.monotonic() + timeout_s
    vm = launcher.start(machine, run_dir, incoming="defer", vm_id=vm_id, detach=detach)
    channel: AgentChannel | None = None
    reading: subprocess.Popen[bytes] | None = None
    try:
        qmp = vm.qmp()
        set_migration(qmp, mode)
        if mode == "mapped":
            with file_uri(qmp, state_file, write=False) as uri:
                qmp.cmd("migrate-incoming", uri=uri)
                _wait_incoming(qmp, deadline)
        elif reader is not None:
            reading = subprocess.Popen(reader, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, env=CHILD_ENV)
            assert reading.stdout is not None
            uri = pass_fd(qmp, reading.stdout.fileno(), "state-in")
            reading.stdout.close()
        else:
            uri = pass_file(qmp, state_file, "state-in")
        if mode != "mapped":
            qmp.cmd("migrate-incoming", uri=uri)
            _wait_incoming(qmp, deadline)
        if reading is not None and reading.wait(timeout=max(1.0, deadline - time.monotonic())) != 0:
            raise TemplateError(f"{reader[0]} failed reading {state_file.name} (exit {reading.returncode})")
        qmp.cmd("cont")
        channel = AgentChannel.connect(vm.paths.agent_socket(0), deadline)
        channel.wait_ready(deadline)
        sandbox = Sandbox(vm, channel, limits)
        refresh_identity(sandbox)
    except BaseException as exc:
        report = vm.failure_report()
        if channel is not None:
            channel.close()
        if reading is not None:
            with contextlib.suppress(OSError):
                reading.kill()
            reading.wait()
        vm.stop()
        if isinstance(exc, Exception):
            raise BootFailed(f"restoring a VM from {state_file.name} failed: {exc}; {report}") from None
        raise
    return sandbox


def refresh_identity(sandbox: Sandbox) -> None:
    """A restored or cloned guest does not know it was cloned: give it fresh entropy and the real time."""
    sandbox.call("reseed", seed_hex=secrets.token_hex(32))
    sandbox.call("set_clock", unix_ns=time.time_ns())


def wait_migration(qmp: Any, want: str, deadline: float) -> None:
    while True:
        info = qmp.cmd("query-migrate")
        status = info.get("status") if isinstance(info, dict) else None
        if status == want:
            return
        if status in {"failed", "cancelled"}:
            raise TemplateError(f"saving VM state failed: {info.get('error-desc', status)}")
        if time.monotonic() > deadline:
            raise TemplateError(f"saving VM state did not finish in time (status {status})")
        time.sleep(0.002)


def _wait_incoming(qmp: Any, deadline: float) -> None:
    """Until the incoming migration has loaded (the VM is then paused, waiting for cont)."""
    while True:
        status = qmp.cmd("query-status")["status"]
        if status not in {"inmigrate", "prelaunch"}:
            if status == "paused" or status == "running":
                return
            raise TemplateError(f"restoring VM state ended in state {status!r}")
        migrate = qmp.cmd("query-migrate")
        if isinstance(migrate, dict) and migrate.get("status") == "failed":
            raise TemplateError(f"restoring VM state failed: {migrate.get('error-desc', 'unknown error')}")
        if time.monotonic() > deadline:
            raise TemplateError("restoring VM state did not finish in time")
        time.sleep(0.002)
