"""Sandboxes as the API sees them: owned by a key, listed in the registry, reachable from any worker process.

This is the one layer between the HTTP resources and the engine. Owners are key hashes; a sandbox that belongs
to another key is reported exactly like one that does not exist.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import secrets
import shutil
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance_agent import frames

from service.engine import (
    Engine,
    EngineError,
    ExecResult,
    Sandbox,
    SandboxBusy,
    SandboxClosed,
    SandboxLost,
    netpolicy,
    network,
    snapshot,
)
from service.engine.channel import AgentChannel
from service.engine.errors import BUSY_MESSAGE
from service.engine.launcher import LauncherClient
from service.engine.machine import MachineConfig, machine_from_json, machine_to_json
from service.engine.vm import VirtualMachine

from .config import ServiceConfig
from .errors import (
    Busy,
    InsufficientStorage,
    Invalid,
    LimitReached,
    NetworkUnavailable,
    NotFound,
    NotReady,
    SandboxLostError,
    ServiceError,
)
from .registry import FROZEN, LOST, POOLED, RUNNING, Registry, SandboxRecord
from .templates import TemplateStore

log = logging.getLogger(__name__)
FILE_CHUNK = 1 << 20
FILE_CALL_TIMEOUT_S = 60.0


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
        persistent: bool = False,
        network_policy: dict[str, Any] | None = None,
    ) -> SandboxRecord:
        """A running sandbox for `owner`: a pooled clone if one is ready, else a clone of the warm template, else
        (a non-default size) a cold boot. `persistent` sandboxes are frozen, not closed, when idle too long.
        `network_policy` ({"egress": ...}, see netpolicy.py) gives it a filtered network; None: no network."""
        wanted = self._network_request(network_policy)  # a bad policy or unresolvable name fails before anything
        self._check_limits(owner)
        timeout = timeout_s or self.config.sandbox_timeout_s
        metadata = metadata or {}
        template = self.templates.current()
        wants_default_size = (vcpus in (None, self.engine.config.vcpus)) and (
            memory_mib in (None, self.engine.config.memory_mib)
        )
        if template is not None and wants_default_size:
            record = self.registry.claim_pooled(owner, template.template_id, timeout, metadata, persistent)
            if record is not None:
                # No reseed here: the keeper reseeded this clone when it made it, and its clock has run since.
                try:
                    pooled = self._attach(record)
                except (SandboxLost, SandboxClosed, OSError) as exc:
                    log.warning("pooled sandbox %s was unusable (%s); cloning a fresh one", record.id, exc)
                    self._destroy(record)
                else:
                    if wanted is not None:
                        try:
                            record.network = self._give_network(pooled, wanted)
                        except BaseException:
                            self._destroy(record)
                            raise
                        self.registry.set_state(record.id, RUNNING, network=record.network)
                    return record
            sandbox_id = new_sandbox_id()
            sandbox = template.clone(
                self.config.sandboxes_dir, self.engine.config.limits, vm_id=sandbox_id, detach=True,
                jail=self.engine.jail,
            )
            machine, template_id = template.machine, template.template_id
        elif template is None and wants_default_size:
            raise NotReady("the service is still warming its template; retry shortly", retry_after=2)
        else:
            sandbox_id = new_sandbox_id()
            machine = self.engine.machine(vcpus=vcpus, memory_mib=memory_mib, agent_ports=self.config.agent_ports)
            sandbox = Sandbox.boot(
                machine, self.config.sandboxes_dir, self.engine.config.limits, self.engine.config.boot_timeout_s,
                detach=True, vm_id=sandbox_id, jail=self.engine.jail,
            )
            template_id = None
        try:
            given = None if wanted is None else self._give_network(sandbox, wanted)
        except BaseException:
            sandbox.close()
            raise
        record = SandboxRecord(
            id=sandbox_id, owner=owner, state=RUNNING, vm_dir=str(sandbox.vm.dir), template_id=template_id,
            machine=machine_to_json(machine), timeout_s=timeout, metadata=metadata, persistent=persistent,
            network=given,
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
        lock_fd = _code_lock(record)
        try:
            sandbox = self._attach(record)
            self.registry.touch(sandbox_id)
            events = sandbox.exec_events(code, timeout_s=timeout_s, language=language)
            first = next(events)
        except SandboxBusy as exc:
            os.close(lock_fd)
            raise Busy(str(exc)) from None
        except (SandboxLost, SandboxClosed) as exc:
            os.close(lock_fd)
            self._mark_lost(record)
            raise SandboxLostError(str(exc)) from None
        except BaseException:
            os.close(lock_fd)
            raise
        return self._rest_of(record, first, events, lock_fd)

    def _rest_of(self, record: SandboxRecord, first: dict, events: Iterator[dict],
                 lock_fd: int) -> Iterator[dict[str, Any]]:
        try:
            yield first
            yield from events
        except SandboxLost as exc:
            self._mark_lost(record)
            yield {"ev": "done", "error": {"name": "SandboxLost", "value": str(exc), "traceback": ""}, "lost": True}
        finally:
            os.close(lock_fd)
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

    # ---- files -----------------------------------------------------------------------------------------------

    def write_file(self, owner: str, sandbox_id: str, path: str, chunks: Iterable[bytes]) -> dict[str, Any]:
        """Stream `chunks` into a file in the sandbox (relative paths are under /data); nothing is buffered whole."""
        sandbox = self._attach(self._running(owner, sandbox_id))
        digest, size, append = hashlib.sha256(), 0, False
        for piece in _rechunk(chunks, FILE_CHUNK):
            self._file_call(sandbox, "file_write", path, payload=piece, append=append)
            digest.update(piece)
            size += len(piece)
            append = True
        if not append:  # an empty upload still makes (or empties) the file
            self._file_call(sandbox, "file_write", path, append=False)
        self.registry.touch(sandbox_id)
        return {"path": path, "size": size, "sha256": digest.hexdigest()}

    def read_file(self, owner: str, sandbox_id: str, path: str) -> tuple[int, Iterator[bytes]]:
        """(size, chunks) of a file in the sandbox; the first chunk is fetched now, so a missing file fails here."""
        sandbox = self._attach(self._running(owner, sandbox_id))
        first = self._file_call(sandbox, "file_read", path, offset=0, max=FILE_CHUNK)
        size = first["size"]

        def chunks() -> Iterator[bytes]:
            reply, offset = first, 0
            while True:
                data = reply.get(frames.PAYLOAD_KEY, b"")
                offset += len(data)
                if data:
                    yield data
                if reply.get("eof") or not data or offset >= size:
                    return
                reply = self._file_call(sandbox, "file_read", path, offset=offset, max=FILE_CHUNK)

        self.registry.touch(sandbox_id)
        return size, chunks()

    def list_dir(self, owner: str, sandbox_id: str, path: str) -> list[dict[str, Any]]:
        sandbox = self._attach(self._running(owner, sandbox_id))
        return self._file_call(sandbox, "list_dir", path)["entries"]

    def _file_call(self, sandbox: Sandbox, op: str, path: str, payload: bytes = b"", **args: Any) -> dict[str, Any]:
        try:
            reply = sandbox.call(op, timeout_s=FILE_CALL_TIMEOUT_S, payload=payload, path=path, **args)
        except SandboxBusy as exc:
            raise Busy(str(exc)) from None
        except SandboxLost as exc:
            raise SandboxLostError(str(exc)) from None
        if reply.get("ev") == "error":
            code = reply.get("code")
            message = reply.get("message", "file operation failed")
            if code == "not_found":
                raise NotFound(message)
            if code in {"is_a_directory", "not_a_directory", "permission_denied"}:
                raise Invalid(message)
            raise ServiceError(message)
        return reply

    # ---- fork, freeze, resume --------------------------------------------------------------------------------

    def snapshot_dir(self, sandbox_id: str) -> Path:
        return self.config.state_dir / "snapshots" / sandbox_id

    def _resume_lock(self, sandbox_id: str) -> Path:
        """Beside the snapshot (which a resume removes): held by whoever resumes the sandbox, flock."""
        return self.snapshot_dir(sandbox_id).with_name(f"{sandbox_id}.lock")

    def freeze(self, owner: str, sandbox_id: str) -> SandboxRecord:
        """Write the sandbox's whole state under the state dir and stop its VM. A failure leaves it running."""
        record = self.get(owner, sandbox_id)
        if record.state == FROZEN:
            return record
        return self.freeze_record(self._running(owner, sandbox_id))

    def freeze_record(self, record: SandboxRecord) -> SandboxRecord:
        self._check_frozen_quota(record)
        sandbox = self._attach_alive(record)
        with _monitor_released(sandbox), _idle_for(record, f"freezing {record.id} failed; it keeps running"), \
                _nic_down(sandbox, record):
            snapshot.freeze(sandbox, self.snapshot_dir(record.id), self.engine.image.image_id,
                            compress=self.config.compress_snapshots)
        self._forget(record.id)
        self.registry.set_state(record.id, FROZEN, template_id=None)  # a snapshot holds all of its RAM
        self.templates.release(record.template_id, self.registry)
        record.state, record.template_id = FROZEN, None
        return record

    def resume(self, owner: str, sandbox_id: str) -> SandboxRecord:
        """Restore a frozen sandbox (same process state, new entropy, the right clock)."""
        record = self.get(owner, sandbox_id)
        if record.state != FROZEN:
            return record
        self._check_limits(owner)
        directory = self.snapshot_dir(sandbox_id)
        with _exclusive_file(self._resume_lock(sandbox_id)):
            record = self.get(owner, sandbox_id)  # another worker may have resumed it while we waited
            if record.state != FROZEN:
                return record
            try:
                frozen = snapshot.Snapshot.load(directory)
                sandbox = snapshot.resume(frozen, self.config.sandboxes_dir, self.engine.config.limits,
                                          self.engine.image.image_id, vm_id=_fresh_vm_id(sandbox_id), detach=True,
                                          jail=self.engine.jail)
            except snapshot.SnapshotMismatch as exc:
                raise Invalid(f"sandbox {sandbox_id} cannot be resumed on this host: {exc}") from None
            except (EngineError, OSError) as exc:
                raise ServiceError(f"resuming {sandbox_id} failed; it stays frozen: {exc}") from None
            try:
                given = None if record.network is None else self._give_network(
                    sandbox, self._network_request(record.network))
            except ServiceError as exc:
                sandbox.close()
                raise type(exc)(f"resuming {sandbox_id} failed; it stays frozen: {exc.message}") from None
            except BaseException:
                sandbox.close()
                raise
            sandbox.detach()
            self.registry.set_state(sandbox_id, RUNNING, vm_dir=str(sandbox.vm.dir),
                                    machine=machine_to_json(sandbox.vm.config), last_active_at=time.time(),
                                    network=given)
            shutil.rmtree(directory, ignore_errors=True)
        return self.get(owner, sandbox_id)

    def fork(self, owner: str, sandbox_id: str, n: int) -> list[SandboxRecord]:
        """n new running sandboxes, each starting from this one's state now; the source keeps running."""
        if not 1 <= n <= self.config.max_fork:
            raise Invalid(f"n must be between 1 and {self.config.max_fork} (service.max_fork)")
        record = self._running(owner, sandbox_id)
        self._check_limits(owner, adding=n)
        self._check_memory(record, n)
        wanted = None if record.network is None else self._network_request(record.network)
        sandbox = self._attach_alive(record)
        ids = [new_sandbox_id() for _ in range(n)]
        failure = f"fork of {sandbox_id} failed; it keeps running unchanged"
        with _monitor_released(sandbox), _idle_for(record, failure), _nic_down(sandbox, record):
            template, clones = snapshot.fork(sandbox, n, self.config.templates_dir, self.config.sandboxes_dir,
                                             self.engine.config.limits, detach=True, vm_ids=ids,
                                             jail=self.engine.jail)
        try:  # each clone: the parent's policy, its own namespace, MAC and address
            networks = [None if wanted is None else self._give_network(clone, wanted) for clone in clones]
        except BaseException as exc:
            for clone in clones:
                clone.close()
            template.remove()
            if isinstance(exc, ServiceError):
                raise type(exc)(f"{failure}: {exc.message}") from None
            raise
        records = []
        for clone_id, clone, given in zip(ids, clones, networks, strict=True):
            clone.detach()
            child = SandboxRecord(
                id=clone_id, owner=owner, state=RUNNING, vm_dir=str(clone.vm.dir), template_id=template.template_id,
                machine=machine_to_json(clone.vm.config), timeout_s=record.timeout_s,
                metadata={**record.metadata, "forked_from": sandbox_id}, persistent=record.persistent,
                network=given,
            )
            self.registry.add(child)
            records.append(child)
        return records

    def _check_frozen_quota(self, record: SandboxRecord) -> None:
        root = self.config.state_dir / "snapshots"
        used = sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) if root.exists() else 0
        worst_case = machine_from_json(record.machine).memory_mib << 20
        if used + worst_case > self.config.frozen_quota_bytes:
            raise InsufficientStorage(
                f"frozen sandboxes use {used >> 20} MiB of the {self.config.frozen_quota_bytes >> 20} MiB quota "
                f"(service.frozen_quota_bytes) and this one may need up to {worst_case >> 20} MiB; delete frozen "
                "sandboxes or raise the quota"
            )

    def _check_memory(self, record: SandboxRecord, n: int) -> None:
        """Refuse a fork up front when the host cannot hold n more copies (each may touch all of its RAM)."""
        available = _mem_available_bytes()
        needed = n * (machine_from_json(record.machine).memory_mib << 20) // 4  # copy-on-write: a quarter each
        if available is not None and needed > available:
            raise InsufficientStorage(
                f"fork of {n} needs about {needed >> 20} MiB of host memory; {available >> 20} MiB is available"
            )

    # ---- network ---------------------------------------------------------------------------------------------

    def _network_request(
        self, requested: dict[str, Any] | None
    ) -> tuple[netpolicy.NetworkPolicy, netpolicy.ResolvedPolicy] | None:
        """The policy checked and its names resolved (now: at creation, and again at each resume)."""
        try:
            policy = netpolicy.parse_policy(None if requested is None else {"egress": requested.get("egress")})
            if policy is None:
                return None
            why = network.unavailable(remote=isinstance(self.engine.jail, LauncherClient))
            if why is not None:
                raise NetworkUnavailable(f"this host cannot give sandboxes a network: {why}")
            return policy, netpolicy.resolve(policy)
        except netpolicy.PolicyError as exc:
            raise Invalid(str(exc)) from None

    def _give_network(
        self, sandbox: Sandbox, wanted: tuple[netpolicy.NetworkPolicy, netpolicy.ResolvedPolicy]
    ) -> dict[str, Any]:
        """Attach the network; returns the record's `network` column (policy plus the new identity)."""
        policy, resolved = wanted
        try:
            attachment = network.attach(sandbox.vm, sandbox.call, policy, self.config.network, resolved)
        except network.NetworkError as exc:
            raise ServiceError(str(exc)) from None
        return {**policy.to_json(), **attachment.describe()}

    # ---- internals -------------------------------------------------------------------------------------------

    def _check_limits(self, owner: str, adding: int = 1) -> None:
        if self.registry.count(owner) + adding > self.config.max_sandboxes_per_key:
            raise LimitReached(
                f"this key already holds {self.config.max_sandboxes_per_key} sandboxes (service.max_sandboxes_per_key);"
                " delete one first",
                retry_after=5,
            )
        if self.registry.count() + adding > self.config.max_sandboxes:
            raise LimitReached(
                f"this host runs its maximum of {self.config.max_sandboxes} sandboxes (service.max_sandboxes);"
                " retry later",
                retry_after=10,
            )

    def _running(self, owner: str, sandbox_id: str) -> SandboxRecord:
        """The sandbox, running: a frozen one is resumed first, transparently."""
        record = self.get(owner, sandbox_id)
        if record.state == FROZEN:
            record = self.resume(owner, sandbox_id)
        if record.state == LOST:
            raise _lost(sandbox_id)
        return record

    def _attach(self, record: SandboxRecord) -> Sandbox:
        """This process's connection to the sandbox, made once on a free agent port and then reused."""
        with self._handles_lock:
            handle = self._handles.get(record.id)
            if handle is not None and not handle.sandbox.closed and handle.sandbox.vm.dir == Path(record.vm_dir):
                return handle.sandbox
            if handle is not None:  # frozen and resumed by another process since: a new VM in a new directory
                del self._handles[record.id]
                handle.sandbox.detach()
                os.close(handle.lock_fd)
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

    def _attach_alive(self, record: SandboxRecord) -> Sandbox:
        """_attach for a freeze or a fork, which work on the VM itself: a VM that died since the pool keeper last
        looked makes the sandbox lost (410) here and now, not an internal error half way through."""
        try:
            sandbox = self._attach(record)
            if sandbox.vm.exited() is None:
                return sandbox
        except (SandboxLost, SandboxClosed):
            pass
        self._mark_lost(record)
        raise _lost(record.id)

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
        shutil.rmtree(self.snapshot_dir(record.id), ignore_errors=True)
        self._resume_lock(record.id).unlink(missing_ok=True)
        self.templates.release(record.template_id, self.registry)

    def _mark_lost(self, record: SandboxRecord) -> None:
        self._forget(record.id)
        with contextlib.suppress(OSError, ValueError):
            VirtualMachine.attach(machine_from_json(record.machine), Path(record.vm_dir)).stop()
        self.registry.set_state(record.id, LOST)

    def close(self) -> None:
        for sandbox_id in list(self._handles):
            self._forget(sandbox_id)
        self.registry.close()


def _lost(sandbox_id: str) -> SandboxLostError:
    return SandboxLostError(f"sandbox {sandbox_id} was lost (its VM stopped); delete it and create a new one")


def _rechunk(chunks: Iterable[bytes], size: int) -> Iterator[bytes]:
    """Pieces of exactly `size` bytes (the last one shorter) from chunks of any size."""
    buffer = bytearray()
    for chunk in chunks:
        buffer += chunk
        while len(buffer) >= size:
            yield bytes(buffer[:size])
            del buffer[:size]
    if buffer:
        yield bytes(buffer)


def _code_lock(record: SandboxRecord) -> int:
    """Held while code runs in the sandbox, and by a fork or freeze of it, across every process (API workers, the
    keeper): flock on a file in its VM directory. Busy if someone holds it. Release with os.close()."""
    fd = os.open(Path(record.vm_dir) / "code.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise Busy(BUSY_MESSAGE) from None
    return fd


@contextlib.contextmanager
def _idle_for(record: SandboxRecord, failure: str) -> Iterator[None]:
    """Hold the code lock for a fork or freeze; engine failures become service errors that start with `failure`."""
    lock_fd = _code_lock(record)
    try:
        yield
    except SandboxBusy as exc:
        raise Busy(str(exc)) from None
    except (EngineError, OSError) as exc:
        raise ServiceError(f"{failure}: {exc}") from None
    finally:
        os.close(lock_fd)


@contextlib.contextmanager
def _monitor_released(sandbox: Sandbox) -> Iterator[None]:
    """A fork or freeze talks to QEMU's monitor, which serves one client at a time: drop the connection when done
    (outermost, after the NIC comes back up), or the next fork or freeze, from another process, waits for it forever."""
    try:
        yield
    finally:
        sandbox.vm.close_monitor()


def _nic_down(sandbox: Sandbox, record: SandboxRecord) -> contextlib.AbstractContextManager[None]:
    """A networked sandbox's state is saved with its NIC link down (see network.link_down)."""
    return network.link_down(sandbox.vm) if record.network is not None else contextlib.nullcontext()


def _fresh_vm_id(sandbox_id: str) -> str:
    """A resumed VM gets a new directory: the frozen one's files may still be on their way out."""
    return f"{sandbox_id}-{secrets.token_hex(2)}"


def _mem_available_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@contextlib.contextmanager
def _exclusive_file(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


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

