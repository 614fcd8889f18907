"""A stand-in for service.sandboxes.SandboxManager: same methods, same errors, no VMs.

Python code really runs (in this process, one namespace per sandbox), so state persists between execs the way
it does in a sandbox; a few magic snippets trigger the failures a real sandbox can produce.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import io
import itertools
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

from service.errors import Busy, LimitReached, NotFound, NotReady, SandboxLostError
from service.registry import LOST, RUNNING, SandboxRecord

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
    def __init__(self, max_per_key: int = 3) -> None:
        self.records: dict[str, SandboxRecord] = {}
        self.namespaces: dict[str, dict[str, Any]] = {}
        self.files: dict[tuple[str, str], bytes] = {}
        self.not_ready: str | None = None
        self.max_per_key = max_per_key
        self.interrupts: list[str] = []
        self.create_calls: list[dict[str, Any]] = []
        self.upload_chunk_sizes: list[int] = []
        self.registry = FakeRegistry(self)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    # ---- lifecycle ----
    def readiness(self) -> str | None:
        return self.not_ready

    def create(self, owner, vcpus=None, memory_mib=None, timeout_s=None, metadata=None) -> SandboxRecord:
        self.create_calls.append({"vcpus": vcpus, "memory_mib": memory_mib, "timeout_s": timeout_s})
        if self.not_ready:
            raise NotReady(self.not_ready, retry_after=2)
        if sum(1 for r in self.records.values() if r.owner == owner) >= self.max_per_key:
            raise LimitReached("this key holds too many sandboxes", retry_after=5)
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
        )
        self.records[record.id] = record
        self.namespaces[record.id] = {}
        return record

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

    def _running(self, owner: str, sandbox_id: str) -> SandboxRecord:
        record = self.get(owner, sandbox_id)
        if record.state == LOST:
            raise SandboxLostError(f"sandbox {sandbox_id} was lost")
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
