"""A stand-in for service.sandboxes.SandboxManager: same methods, same errors, no VMs.

Python code really runs (in this process, one namespace per sandbox), so state persists between execs the way
it does in a sandbox; a few magic snippets trigger the failures a real sandbox can produce.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import hashlib
import io
import itertools
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

from service.errors import (
    Busy,
    InsufficientStorage,
    Invalid,
    LimitReached,
    NotFound,
    NotReady,
    ServiceError,
)
from service.registry import FROZEN, LOST, RUNNING, SandboxRecord

BUSY_CODE = "# busy"  # the sandbox reports it is already running code
LOST_CODE = "# lose the vm"  # the VM dies after printing a line
CRASH_CODE = "# crash the service"  # the manager raises something unexpected mid-exec
CHUNKS_CODE = "# three chunks"  # stdout in three events, then a display, then a value


class FakeRegistry:
    def __init__(self, manager: FakeManager) -> None:
        self._manager = manager

    def counts_by_state(self) -> dict[str, int]:
        counts = {"pooled": 0, "running": 0, "frozen": 0, "lost": 0}
        for record in self._manager.records.values():
            counts[record.state] += 1
        return counts


class FakeManager:
    def __init__(self, max_per_key: int = 3, max_fork: int = 64, max_frozen: int = 2) -> None:
        self.records: dict[str, SandboxRecord] = {}
        self.namespaces: dict[str, dict[str, Any]] = {}
        self.files: dict[tuple[str, str], bytes] = {}
        self.not_ready: str | None = None
        self.max_per_key = max_per_key  # running sandboxes per key, as service.max_sandboxes_per_key
        self.max_fork = max_fork
        self.max_frozen = max_frozen  # the frozen quota, counted in sandboxes instead of bytes
        self.busy: set[str] = set()  # sandboxes that report they are running code (fork/freeze refused)
        self.fork_memory_short = False  # the host lacks memory for the copies: 507
        self.fail_next_fork = False  # the fork fails half way (after the checks): 500, nothing left behind
        self.unrestorable: set[str] = set()  # frozen sandboxes whose snapshot this host refuses: 422
        self.interrupts: list[str] = []
        self.create_calls: list[dict[str, Any]] = []
        self.upload_chunk_sizes: list[int] = []
        self.registry = FakeRegistry(self)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    # ---- lifecycle ----
    def readiness(self) -> str | None:
        return self.not_ready

    def create(
        self, owner, vcpus=None, memory_mib=None, timeout_s=None, metadata=None, persistent=False,
        network_policy=None,
    ) -> SandboxRecord:
        self.create_calls.append(
            {"vcpus": vcpus, "memory_mib": memory_mib, "timeout_s": timeout_s, "persistent": persistent,
             "network": network_policy}
        )
        if self.not_ready:
            raise NotReady(self.not_ready, retry_after=2)
        self._check_limits(owner)
        now = time.time()
        record = SandboxRecord(
            id=f"sb-{next(self._ids):016x}",
            owner=owner,
            state=RUNNING,
            vm_dir="/nonexistent",
            template_id="tpl-fake",
            machine={"vcpus": vcpus or 1, "memory_mib": memory_mib or 1024},
            timeout_s=timeout_s or 900.0,
            metadata=metadata or {},
            created_at=now,
            last_active_at=now,
            persistent=persistent,
            network=None if network_policy is None else {**network_policy, "mac": "02:00:00:00:00:01",
                                                         "address": "100.96.0.14"},
        )
        self.records[record.id] = record
        self.namespaces[record.id] = {}
        return record

    def _check_limits(self, owner: str, adding: int = 1) -> None:
        running = sum(1 for r in self.records.values() if r.owner == owner and r.state == RUNNING)
        if running + adding > self.max_per_key:
            raise LimitReached(
                f"this key already holds {running} of {self.max_per_key} sandboxes (service.max_sandboxes_per_key)",
                retry_after=5,
            )

    def get(self, owner: str, sandbox_id: str) -> SandboxRecord:
        record = self.records.get(sandbox_id)
        if record is None or record.owner != owner:
            raise NotFound(f"no sandbox {sandbox_id!r}")
        return record

    def list(self, owner: str, state: str | None = None) -> list[SandboxRecord]:
        return [r for r in self.records.values() if r.owner == owner and (state is None or r.state == state)]

    def delete(self, owner: str, sandbox_id: str) -> None:
        self.get(owner, sandbox_id)
        del self.records[sandbox_id]
        self.namespaces.pop(sandbox_id, None)

    def _running(self, owner: str, sandbox_id: str) -> SandboxRecord:
        record = self.get(owner, sandbox_id)
        if record.state == FROZEN:
            record = self.resume(owner, sandbox_id)
        return record

    # ---- fork, freeze, resume ----
    def fork(self, owner: str, sandbox_id: str, n: int) -> list[SandboxRecord]:
        if not 1 <= n <= self.max_fork:
            raise Invalid(f"n must be between 1 and {self.max_fork} (service.max_fork)")
        source = self._running(owner, sandbox_id)
        self._check_limits(owner, adding=n)
        if self.fork_memory_short:
            raise InsufficientStorage(f"fork of {n} needs about {n * 256} MiB of host memory; 100 MiB is available")
        if sandbox_id in self.busy:
            raise Busy("the sandbox is running code; wait for it or interrupt it first")
        if self.fail_next_fork:
            self.fail_next_fork = False
            raise ServiceError(f"fork of {sandbox_id} failed; it keeps running unchanged: injected")
        clones = []
        for _ in range(n):
            now = time.time()
            clone = copy.copy(source)
            clone.id, clone.created_at, clone.last_active_at = f"sb-{next(self._ids):016x}", now, now
            clone.template_id = f"tpl-fork-{sandbox_id}"
            clone.metadata = {**source.metadata, "forked_from": sandbox_id}
            self.records[clone.id] = clone
            self.namespaces[clone.id] = _copy_namespace(self.namespaces[sandbox_id])
            clones.append(clone)
        return clones

    def freeze(self, owner: str, sandbox_id: str) -> SandboxRecord:
        record = self.get(owner, sandbox_id)
        if record.state == FROZEN:
            return record
        record = self._running(owner, sandbox_id)
        if sandbox_id in self.busy:
            raise Busy("the sandbox is running code; wait for it or interrupt it first")
        if sum(1 for r in self.records.values() if r.state == FROZEN) >= self.max_frozen:
            raise InsufficientStorage("frozen sandboxes use the whole quota (service.frozen_quota_bytes)")
        record.state, record.template_id = FROZEN, None
        return record

    def resume(self, owner: str, sandbox_id: str) -> SandboxRecord:
        record = self.get(owner, sandbox_id)
        if record.state != FROZEN:
            return record
        self._check_limits(owner)
        if sandbox_id in self.unrestorable:
            raise Invalid(f"sandbox {sandbox_id} cannot be resumed on this host: snapshot made by another QEMU")
        record.state, record.last_active_at = RUNNING, time.time()
        return record

    # ---- code ----
    def exec_events(self, owner, sandbox_id, code, language="python", timeout_s=None) -> Iterator[dict[str, Any]]:
        record = self._running(owner, sandbox_id)
        if code == BUSY_CODE:
            raise Busy("the sandbox is already running code; wait for it or interrupt it")
        return self._events(record, code, language)

    def _events(self, record: SandboxRecord, code: str, language: str) -> Iterator[dict[str, Any]]:
        if code == LOST_CODE:
            yield {"ev": "stdout", "data": "about to die\n"}
            record.state = LOST
            yield {
                "ev": "done",
                "error": {"name": "SandboxLost", "value": "the VM stopped", "traceback": ""},
                "lost": True,
            }
            return
        if code == CRASH_CODE:
            yield {"ev": "stdout", "data": "partial\n"}
            raise RuntimeError("boom: something the service did not expect")
        if code == CHUNKS_CODE:
            for i in range(3):
                yield {"ev": "stdout", "data": f"chunk {i}\n"}
            yield {"ev": "display", "data": {"text/plain": "<Figure>", "image/png": "iVBORw0KGgo="}}
            yield {
                "ev": "done",
                "value": {"text/plain": "42"},
                "error": None,
                "exit_code": None,
                "truncated_bytes": 0,
                "worker_restarted": False,
                "worker_exit": None,
                "duration_s": 0.001,
            }
            return
        if language == "bash":
            yield {"ev": "stdout", "data": f"bash: {code}\n"}
            yield {
                "ev": "done",
                "value": None,
                "error": None,
                "exit_code": 0,
                "truncated_bytes": 0,
                "worker_restarted": False,
                "worker_exit": None,
                "duration_s": 0.001,
            }
            return
        yield from self._python(record, code)

    def _python(self, record: SandboxRecord, code: str) -> Iterator[dict[str, Any]]:
        namespace = self.namespaces[record.id]
        out = io.StringIO()
        value, error = None, None
        try:
            tree = ast.parse(code)
            last = tree.body[-1] if tree.body and isinstance(tree.body[-1], ast.Expr) else None
            if last is not None:
                tree.body.pop()
            with contextlib.redirect_stdout(out):
                exec(compile(tree, "<cell>", "exec"), namespace)
                if last is not None:
                    result = eval(compile(ast.Expression(last.value), "<cell>", "eval"), namespace)
                    if result is not None:
                        value = {"text/plain": repr(result)}
        except Exception as exc:
            error = {"name": type(exc).__name__, "value": str(exc), "traceback": f"{type(exc).__name__}: {exc}"}
        if out.getvalue():
            yield {"ev": "stdout", "data": out.getvalue()}
        yield {
            "ev": "done",
            "value": value,
            "error": error,
            "exit_code": None,
            "truncated_bytes": 0,
            "worker_restarted": False,
            "worker_exit": None,
            "duration_s": 0.001,
        }

    def interrupt(self, owner: str, sandbox_id: str) -> None:
        self._running(owner, sandbox_id)
        self.interrupts.append(sandbox_id)

    # ---- files ----
    def write_file(self, owner: str, sandbox_id: str, path: str, chunks: Iterable[bytes]) -> dict[str, Any]:
        self._running(owner, sandbox_id)
        digest, data = hashlib.sha256(), bytearray()
        for chunk in chunks:
            self.upload_chunk_sizes.append(len(chunk))
            digest.update(chunk)
            data += chunk
        self.files[(sandbox_id, path)] = bytes(data)
        return {"path": path, "size": len(data), "sha256": digest.hexdigest()}

    def read_file(self, owner: str, sandbox_id: str, path: str) -> tuple[int, Iterator[bytes]]:
        self._running(owner, sandbox_id)
        if (sandbox_id, path) not in self.files:
            raise NotFound(f"no file {path!r} in sandbox {sandbox_id}")
        data = self.files[(sandbox_id, path)]
        return len(data), (data[i : i + 1000] for i in range(0, len(data), 1000))

    def list_dir(self, owner: str, sandbox_id: str, path: str) -> list[dict[str, Any]]:
        self._running(owner, sandbox_id)
        prefix = path.rstrip("/") + "/"
        return [
            {"name": name[len(prefix) :], "type": "file", "size": len(data), "mtime": 0.0}
            for (sid, name), data in sorted(self.files.items())
            if sid == sandbox_id and name.startswith(prefix) and "/" not in name[len(prefix) :]
        ]


def _copy_namespace(namespace: dict[str, Any]) -> dict[str, Any]:
    """What a fork does to a process: every object copied (modules, which cannot be, are shared)."""
    copied = {}
    for name, value in namespace.items():
        try:
            copied[name] = copy.deepcopy(value)
        except TypeError:
            copied[name] = value
    return copied
