"""Sandboxes as the API sees them: owned by a key, listed in the registry, reachable from any worker process.

This is the one layer between the HTTP resources and the engine. Owners are key hashes; a sandbox that belongs
to another key is reported exactly like one that does not exist.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.engine import Engine, ExecResult, Sandbox, SandboxBusy, SandboxClosed, SandboxLost
from service.engine.channel import AgentChannel
from service.engine.machine import MachineConfig, machine_from_json, machine_to_json
from service.engine.template import refresh_identity
from service.engine.vm import VirtualMachine

from .config import ServiceConfig
from .errors import Busy, LimitReached, NotFound, NotReady, SandboxLostError
from .registry import LOST, POOLED, RUNNING, Registry, SandboxRecord
from .templates import TemplateStore

log = logging.getLogger(__name__)


@dataclass
class _Handle:
    sandbox: Sandbox
    lock_fd: int


def new_sandbox_id() -> str:
    return "sb-" + secrets.token_hex(8)


class SandboxManager:
    def __init__(self, config: ServiceConfig, engine: Engine | None = None, registry: Registry | None = None) -> None:
        self.config = config
        self.engine = engine or Engine(config.engine)
        self.registry = registry or Registry(config.registry_path)
        self.templates = TemplateStore(config.templates_dir)
        self._handles: dict[str, _Handle] = {}
        self._handles_lock = threading.Lock()

    # ---- lifecycle -------------------------------------------------------------------------------------------

    def readiness(self) -> str | None:
        """None when creates can be served from a warm template; else why not."""
        if self.templates.current() is None:
            return "no warm template yet: the pool keeper is still booting it"
        return None

    def create(
        self,
        owner: str,
        vcpus: int | None = None,
        memory_mib: int | None = None,
        timeout_s: float | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> SandboxRecord:
        self._check_limits(owner)
        timeout = timeout_s or self.config.sandbox_timeout_s
        metadata = metadata or {}
        template = self.templates.current()
        wants_default_size = (vcpus in (None, self.engine.config.vcpus)) and (
            memory_mib in (None, self.engine.config.memory_mib)
        )
        if template is not None and wants_default_size:
            record = self.registry.claim_pooled(owner, template.template_id, timeout, metadata)
            if record is not None:
                try:
                    refresh_identity(self._attach(record))
                    return record
                except (SandboxLost, SandboxClosed, OSError) as exc:
                    log.warning("pooled sandbox %s was unusable (%s); cloning a fresh one", record.id, exc)
                    self._destroy(record)
            sandbox_id = new_sandbox_id()
            sandbox = template.clone(
                self.config.sandboxes_dir, self.engine.config.limits, vm_id=sandbox_id, detach=True
            )
            machine, template_id = template.machine, template.template_id
        elif template is None and wants_default_size:
            raise NotReady("the service is still warming its template; retry shortly", retry_after=2)
        else:
            sandbox_id = new_sandbox_id()
            machine = self.engine.machine(vcpus=vcpus, memory_mib=memory_mib, agent_ports=self.config.agent_ports)
            sandbox = Sandbox.boot(
                machine, self.config.sandboxes_dir, self.engine.config.limits, self.engine.config.boot_timeout_s,
                detach=True, vm_id=sandbox_id,
            )
            template_id = None
        record = SandboxRecord(
            id=sandbox_id, owner=owner, state=RUNNING, vm_dir=str(sandbox.vm.dir), template_id=template_id,
            machine=machine_to_json(machine), timeout_s=timeout, metadata=metadata,
        )
        sandbox.detach()  # the creating connection used port 0; workers attach on their own ports
        self.registry.add(record)
        return record

    def get(self, owner: str, sandbox_id: str) -> SandboxRecord:
        record = self.registry.get(sandbox_id)
        if record is None or record.owner != owner or record.state == POOLED:
            raise NotFound(f"no sandbox {sandbox_id!r} (it never existed, was closed, or belongs to another key)")
        return record

    def list(self, owner: str, state: str | None = None) -> list[SandboxRecord]:
        return self.registry.list(owner=owner, state=state)

    def delete(self, owner: str, sandbox_id: str) -> None:
        self._destroy(self.get(owner, sandbox_id))

    # ---- code ------------------------------------------------------------------------------------------------

    def exec_events(
        self, owner: str, sandbox_id: str, code: str, language: str = "python", timeout_s: float | None = None
    ) -> Iterator[dict[str, Any]]:
        """The exec's events as they come; raises Busy / NotFound / SandboxLostError before the first one."""
        record = self._running(owner, sandbox_id)
        sandbox = self._attach(record)
        self.registry.touch(sandbox_id)
        try:
            events = sandbox.exec_events(code, timeout_s=timeout_s, language=language)
            first = next(events)
        except SandboxBusy as exc:
            raise Busy(str(exc)) from None
        except (SandboxLost, SandboxClosed) as exc:
            self._mark_lost(record)
            raise SandboxLostError(str(exc)) from None
        return self._rest_of(record, first, events)

    def _rest_of(self, record: SandboxRecord, first: dict, events: Iterator[dict]) -> Iterator[dict[str, Any]]:
        try:
            yield first
            yield from events
        except SandboxLost as exc:
            self._mark_lost(record)
            yield {"ev": "done", "error": {"name": "SandboxLost", "value": str(exc), "traceback": ""}, "lost": True}
        finally:
            self.registry.touch(record.id)

    def exec(self, owner: str, sandbox_id: str, code: str, language: str = "python",
             timeout_s: float | None = None) -> ExecResult:
        result = ExecResult()
        for event in self.exec_events(owner, sandbox_id, code, language, timeout_s):
            result.add(event)
        return result

    def interrupt(self, owner: str, sandbox_id: str) -> None:
        record = self._running(owner, sandbox_id)
        self._attach(record).interrupt()

    # ---- internals -------------------------------------------------------------------------------------------

    def _check_limits(self, owner: str) -> None:
        if self.registry.count(owner) >= self.config.max_sandboxes_per_key:
            raise LimitReached(
                f"this key already holds {self.config.max_sandboxes_per_key} sandboxes (service.max_sandboxes_per_key);"
                " delete one first",
                retry_after=5,
            )
        if self.registry.count() >= self.config.max_sandboxes:
            raise LimitReached(
                f"this host runs its maximum of {self.config.max_sandboxes} sandboxes (service.max_sandboxes);"
                " retry later",
                retry_after=10,
            )

    def _running(self, owner: str, sandbox_id: str) -> SandboxRecord:
        record = self.get(owner, sandbox_id)
        if record.state == LOST:
            raise SandboxLostError(f"sandbox {sandbox_id} was lost (its VM stopped); delete it and create a new one")
        return record

    def _attach(self, record: SandboxRecord) -> Sandbox:
        """This process's connection to the sandbox, made once on a free agent port and then reused."""
        with self._handles_lock:
            handle = self._handles.get(record.id)
            if handle is not None and not handle.sandbox.closed:
                return handle.sandbox
            machine = machine_from_json(record.machine)
            vm_dir = Path(record.vm_dir)
            try:
                vm = VirtualMachine.attach(machine, vm_dir)
            except (OSError, ValueError) as exc:
                raise SandboxLost(f"sandbox {record.id} has no VM: {exc}") from None
            if vm.exited() is not None:
                raise SandboxLost(f"the VM of sandbox {record.id} is not running")
            port, lock_fd = _claim_port(vm_dir, machine)
            try:
                channel = AgentChannel.connect(vm.paths.agent_socket(port), time.monotonic() + 5)
            except Exception:
                os.close(lock_fd)
                raise
            sandbox = Sandbox(vm, channel, self.engine.config.limits)
            self._handles[record.id] = _Handle(sandbox, lock_fd)
            return sandbox

    def _forget(self, sandbox_id: str) -> _Handle | None:
        with self._handles_lock:
            handle = self._handles.pop(sandbox_id, None)
        if handle is not None:
            handle.sandbox.detach()
            os.close(handle.lock_fd)
        return handle

    def _destroy(self, record: SandboxRecord) -> None:
        self._forget(record.id)
        with contextlib.suppress(OSError, ValueError):
            VirtualMachine.attach(machine_from_json(record.machine), Path(record.vm_dir)).stop()
        self.registry.remove(record.id)

    def _mark_lost(self, record: SandboxRecord) -> None:
        self._forget(record.id)
        with contextlib.suppress(OSError, ValueError):
            VirtualMachine.attach(machine_from_json(record.machine), Path(record.vm_dir)).stop()
        self.registry.set_state(record.id, LOST)

    def close(self) -> None:
        for sandbox_id in list(self._handles):
            self._forget(sandbox_id)
        self.registry.close()


def _claim_port(vm_dir: Path, machine: MachineConfig) -> tuple[int, int]:
    """An agent port no other process holds, locked (flock) for as long as this process keeps it.

    Port 0 is left to whoever creates or restores the VM; the lock dies with the process that holds it."""
    for port in range(1, machine.agent_ports):
        fd = os.open(vm_dir / f"agent-{port}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return port, fd
    raise Busy("every connection to this sandbox is in use by other workers; retry", retry_after=1)

