"""Run the guest agent on this host as a subprocess and speak the wire protocol to it (for tests).

The agent starts in its own session; close() ends it and then kills by PID every process still in that
session (the worker, bash commands, orphans of user code), so a failing test leaves nothing behind.
Fixtures built on this live in tests/unit/conftest.py (`agent`, `agent_factory`).
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from appliance_agent import protocol

FINAL_EVENTS = frozenset({"done", "ok", "pong", "error"})
# How long a test waits for anything the agent should do at once: long enough that only a hang reaches it on a
# loaded machine, so no test depends on how fast this host is (bench/agent_bench.py measures that).
HANG_DEADLINE_S = 60.0


@dataclass
class ExecResult:
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def done(self) -> dict[str, Any]:
        assert self.events and self.events[-1]["ev"] == "done", self.events[-3:]
        return self.events[-1]

    @property
    def stdout(self) -> str:
        return "".join(event["data"] for event in self.events if event["ev"] == "stdout")

    @property
    def stderr(self) -> str:
        return "".join(event["data"] for event in self.events if event["ev"] == "stderr")

    @property
    def displays(self) -> list[dict[str, str]]:
        return [event["data"] for event in self.events if event["ev"] == "display"]

    @property
    def value(self) -> str | None:
        value = self.done["value"]
        return None if value is None else value["text/plain"]

    @property
    def error(self) -> dict[str, str] | None:
        return self.done["error"]


class AgentConnection:
    """One protocol stream to an agent: requests out, events in, with deadlines."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self.read_fd = read_fd
        self.write_fd = write_fd
        self._reader = protocol.LineReader()
        self._pending: list[dict[str, Any]] = []
        self._stash: list[dict[str, Any]] = []
        self._ids = iter(range(1, 1 << 62))
        self._selector = selectors.DefaultSelector()
        self._selector.register(read_fd, selectors.EVENT_READ)

    def send_raw(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.write_fd, view) :]

    def send_raw_request(self, message: dict[str, Any]) -> int:
        """A request encoded with JSON escapes for every non-ASCII character (even a lone surrogate)."""
        request_id = next(self._ids)
        self.send_raw(json.dumps({"id": request_id, **message}).encode("ascii") + b"\n")
        return request_id

    def send(self, op: str, **args: Any) -> int:
        request_id = next(self._ids)
        self.send_raw(protocol.encode({"id": request_id, "op": op, **args}))
        return request_id

    def next_event(self, timeout: float = HANG_DEADLINE_S) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while not self._pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._selector.select(remaining):
                raise TimeoutError(f"no event from the agent within {timeout} s")
            chunk = os.read(self.read_fd, 1 << 20)
            if not chunk:
                raise EOFError("the agent closed its end of the channel")
            self._pending.extend(json.loads(line) for line in self._reader.feed(chunk))
        return self._pending.pop(0)

    def events_for(self, request_id: int, timeout: float = HANG_DEADLINE_S) -> list[dict[str, Any]]:
        """The events answering request_id up to its final one; other ids' events are kept for their turn."""
        deadline = time.monotonic() + timeout
        events = []
        while True:
            mine = [event for event in self._stash if event["id"] == request_id]
            if mine:
                self._stash = [event for event in self._stash if event["id"] != request_id]
            else:
                event = self.next_event(max(0.0, deadline - time.monotonic()))
                if event["id"] != request_id:
                    if event["id"] != 0:  # id 0: hello, or an error about an unparseable line
                        self._stash.append(event)
                    continue
                mine = [event]
            for event in mine:
                events.append(event)
                if event["ev"] in FINAL_EVENTS:
                    return events

    def call(self, op: str, timeout: float = HANG_DEADLINE_S, **args: Any) -> dict[str, Any]:
        return self.events_for(self.send(op, **args), timeout)[-1]

    def run(self, code: str, timeout: float = HANG_DEADLINE_S, **args: Any) -> ExecResult:
        """An exec; returns all its events. timeout is how long the test waits, timeout_s the agent's own."""
        return ExecResult(self.events_for(self.send("exec", code=code, **args), timeout))

    def worker_pid(self) -> int:
        return self.call("ping")["worker_pid"]

    def close(self) -> None:
        self._selector.close()


class AgentProcess(AgentConnection):
    """`python -m appliance_agent --stdio [args]` in a new session."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stdin is not None and process.stdout is not None
        super().__init__(process.stdout.fileno(), process.stdin.fileno())
        self.process = process
        self.pid = process.pid

    @classmethod
    def start(
        cls,
        *args: str,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        pass_fds: tuple[int, ...] = (),
        stdio: bool = True,
        prefix: tuple[str, ...] = (),
    ) -> AgentProcess:
        argv = [*prefix, sys.executable, "-m", "appliance_agent", *(("--stdio",) if stdio else ()), *args]
        process = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            pass_fds=pass_fds,
            start_new_session=True,
        )
        return cls(process)

    def hello(self, timeout: float = HANG_DEADLINE_S) -> dict[str, Any]:
        event = self.next_event(timeout)
        assert event["ev"] == "hello", event
        return event

    def close(self) -> None:
        """End the agent (end of stdin asks it to stop), then kill whatever of its session is left."""
        try:
            if self.process.stdin is not None:
                self.process.stdin.close()
        except OSError:
            pass
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
        kill_session(self.pid)
        if self.process.stdout is not None:
            self.process.stdout.close()
        super().close()


def session_members(session_id: int) -> list[int]:
    """PIDs of the live processes in a session (from /proc/<pid>/stat)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # After "pid (comm)": state ppid pgrp session ...
        if int(fields[3]) == session_id and fields[0] != "Z":
            members.append(int(entry))
    return members


def kill_session(session_id: int) -> None:
    for _ in range(50):
        members = session_members(session_id)
        if not members:
            return
        for pid in members:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)


def children_of(pid: int) -> list[tuple[int, str]]:
    """(pid, state) of the processes whose parent is pid, zombies included."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append((int(entry), fields[0]))
    return found


def wait_for(condition: Callable[[], bool], what: str, deadline_s: float = HANG_DEADLINE_S) -> None:
    """Poll until condition() holds; fail naming `what` if it still does not after a hang deadline."""
    deadline = time.monotonic() + deadline_s
    while not condition():
        assert time.monotonic() < deadline, f"still waiting after {deadline_s:g} s for {what}"
        time.sleep(0.01)
