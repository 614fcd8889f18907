"""A sandbox: one microVM with a live Python process, and the calls a user makes on it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .channel import AgentChannel
from .errors import AgentProtocolError, AgentTimeout, BootFailed, SandboxBusy, SandboxClosed, SandboxLost
from .launch import VmmLauncher
from .machine import MachineConfig
from .result_budget import ResultBudget
from .vm import VirtualMachine

# How long past the exec's own timeout + grace we wait for the agent before declaring the VM lost.
_HOST_SLACK_S = 15.0
_CALL_WAIT_S = 2.0  # longest wait for a single-answer call of this process to finish (a file op, a watch poll)

EventHandler = Callable[[dict[str, Any]], None]


@dataclass
class ExecResult:
    stdout: str = ""
    stderr: str = ""
    value: dict[str, Any] | None = None  # MIME bundle of the trailing expression
    displays: list[dict[str, Any]] = field(default_factory=list)  # MIME bundles shown while running
    error: dict[str, Any] | None = None  # {name, value, traceback}
    exit_code: int | None = None  # bash only
    truncated_bytes: int = 0
    worker_restarted: bool = False
    worker_exit: str | None = None
    duration_s: float = 0.0

    @property
    def text(self) -> str | None:
        return None if self.value is None else self.value.get("text/plain")

    @property
    def ok(self) -> bool:
        return self.error is None

    def add(self, event: dict[str, Any]) -> None:
        """Fold one agent event into the result."""
        kind = event.get("ev")
        if kind == "stdout":
            self.stdout += event["data"]
        elif kind == "stderr":
            self.stderr += event["data"]
        elif kind == "display":
            self.displays.append(event["data"])
        elif kind == "done":
            self.value = event.get("value")
            self.error = event.get("error")
            self.exit_code = event.get("exit_code")
            self.truncated_bytes = event.get("truncated_bytes", 0)
            self.worker_restarted = event.get("worker_restarted", False)
            self.worker_exit = event.get("worker_exit")
            self.duration_s = event.get("duration_s", 0.0)
        elif kind == "error":
            self.error = {"name": "AgentError", "value": event.get("message", ""), "traceback": ""}


@dataclass(frozen=True)
class ExecLimits:
    """engine.exec_timeout_s, engine.interrupt_grace_s, engine.output_cap_bytes, engine.result_cap_bytes."""

    timeout_s: float
    grace_s: float
    output_cap: int  # stdout + stderr, counted by the agent (and its marker)
    result_cap: int  # everything one exec returns (streams, displays, value), counted again on the host


class Sandbox:
    def __init__(self, vm: VirtualMachine, channel: AgentChannel, limits: ExecLimits) -> None:
        self.vm = vm
        self._channel = channel
        self.limits = limits
        self._exec_lock = threading.Lock()
        self._closed = False
        self.boot_seconds = 0.0

    @classmethod
    def boot(
        cls,
        config: MachineConfig,
        run_dir: Path,
        limits: ExecLimits,
        boot_timeout_s: float,
        launcher: VmmLauncher,
        die_with_parent: bool = False,
        detach: bool = False,
        vm_id: str | None = None,
    ) -> Sandbox:
        """Start a VM and wait until its agent answers. On any failure (or Ctrl-C) the VM is gone again."""
        started = time.monotonic()
        deadline = started + boot_timeout_s
        vm = launcher.start(config, run_dir, die_with_parent=die_with_parent, detach=detach, vm_id=vm_id)
        channel: AgentChannel | None = None
        try:
            channel = AgentChannel.connect(vm.paths.agent_socket(0), deadline)
            channel.wait_ready(deadline)
        except (AgentTimeout, SandboxLost) as exc:
            code = vm.exited()
            settle = time.monotonic() + 1.0  # a broken connection often means QEMU is exiting right now
            while code is None and isinstance(exc, SandboxLost) and time.monotonic() < settle:
                time.sleep(0.01)
                code = vm.exited()
            report = vm.failure_report()
            if channel is not None:
                channel.close()
            vm.stop()
            if code is not None:
                raise BootFailed(f"QEMU exited with code {code} during boot: {report}") from None
            raise BootFailed(f"the guest did not become ready within {boot_timeout_s:g}s ({exc}); {report}") from None
        except BaseException:
            if channel is not None:
                channel.close()
            vm.stop()
            raise
        sandbox = cls(vm, channel, limits)
        sandbox.boot_seconds = time.monotonic() - started
        return sandbox

    @property
    def vm_dir(self) -> Path:
        """The VM's own directory: what the registry keeps to find the VM again from any process."""
        return self.vm.dir

    @property
    def running(self) -> bool:
        """Its QEMU is still alive (whoever started it)."""
        return self.vm.exited() is None

    @property
    def closed(self) -> bool:
        return self._closed

    def run_code(
        self,
        code: str,
        timeout_s: float | None = None,
        language: str = "python",
        on_event: EventHandler | None = None,
    ) -> ExecResult:
        """Run code in the persistent interpreter (or a bash command); stream events to `on_event` as they come."""
        result = ExecResult()
        for event in self.exec_events(code, timeout_s, language):
            result.add(event)
            if on_event is not None:
                on_event(event)
        return result

    def exec_events(self, code: str, timeout_s: float | None = None, language: str = "python",
                    envs: dict[str, str] | None = None) -> Iterator[dict]:
        """The agent's events for one exec as they arrive, ending with `done`. One exec at a time per sandbox:
        SandboxBusy if this process or (through another agent port) another one is already running code.
        `envs`: environment variables for this exec only (the agent checks them again)."""
        if self._closed:
            raise SandboxClosed("the sandbox is closed")
        # A single-answer call (a file op, a watch poll) holds the lock for one round trip: wait that out, so
        # only a running exec (or fork, freeze) makes this one busy.
        if not self._exec_lock.acquire(timeout=_CALL_WAIT_S):
            raise SandboxBusy()
        try:
            timeout = self.limits.timeout_s if timeout_s is None else timeout_s
            request_id = self._channel.send(
                "exec",
                code=code,
                language=language,
                timeout_s=timeout,
                grace_s=self.limits.grace_s,
                output_cap=self.limits.output_cap,
                **({"envs": envs} if envs else {}),
            )
            deadline = time.monotonic() + timeout + self.limits.grace_s + _HOST_SLACK_S
            budget = ResultBudget(self.limits.result_cap)
            try:
                for event in self._channel.events(request_id, deadline):
                    if event.get("ev") == "error" and event.get("code") == "busy":
                        raise SandboxBusy()
                    yield from budget.admit(event)
            except AgentProtocolError as exc:
                yield budget.admit({"id": request_id, "ev": "done", "value": None, "exit_code": None,
                                    "error": {"name": "AgentProtocolError", "value": str(exc), "traceback": ""}})[0]
            except (AgentTimeout, SandboxLost) as exc:
                self._lose(str(exc))
        finally:
            self._exec_lock.release()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the sandbox idle (no exec from this process can start) for a freeze or a fork."""
        if not self._exec_lock.acquire(timeout=_CALL_WAIT_S):
            raise SandboxBusy()
        try:
            yield
        finally:
            self._exec_lock.release()

    def interrupt(self) -> None:
        """KeyboardInterrupt in the running code, if any; the namespace is kept."""
        if not self._closed:
            self._channel.send("interrupt")

    def call(self, op: str, timeout_s: float = 10.0, payload: bytes = b"", **args: Any) -> dict[str, Any]:
        """A request with a single answer (ping, reseed, set_clock, restart_worker, file operations)."""
        return self.call_with(op, args, timeout_s, payload)

    def call_with(self, op: str, args: dict[str, Any], timeout_s: float = 10.0, payload: bytes = b"") -> dict[str, Any]:
        """call() with the request's arguments as a dict: they may then use any name (a command's own timeout_s)."""
        if self._closed:
            raise SandboxClosed("the sandbox is closed")
        # One reader per connection: a call waits for a running exec of this process (or gives up busy).
        if not self._exec_lock.acquire(timeout=timeout_s):
            raise SandboxBusy()
        try:
            return self._channel.call(op, time.monotonic() + timeout_s, payload, **args)
        except (AgentTimeout, SandboxLost, AgentProtocolError) as exc:  # a call's answer broken: no longer trusted
            self._lose(str(exc))
            raise AssertionError("unreachable") from None
        finally:
            self._exec_lock.release()

    def close(self) -> None:
        """Stop the VM and remove its files."""
        if self._closed:
            return
        self._closed = True
        self._channel.close()
        self.vm.stop()

    def detach(self) -> None:
        """Drop this process's connections; the VM keeps running for whoever attaches next."""
        self._closed = True
        self._channel.close()
        self.vm.close_monitor()

    def _lose(self, why: str) -> None:
        report = self.vm.failure_report()
        self.close()
        raise SandboxLost(f"sandbox lost: {why}; {report}")

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
