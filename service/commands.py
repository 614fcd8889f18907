"""Commands beside the REPL (issue 15): the service's side of the agent's cmd_* ops (appliance_agent/commands.py).

Calls go over this process's second connection to the sandbox (SandboxManager.commands_sandbox), so a command call
never waits for an exec that streams on the first. The agent answers at once; waiting (for output past an offset,
for the end of a command) is done here by asking again, at intervals that grow from POLL_FIRST_S to POLL_MAX_S:
each ask is one short round trip, and the connection is free for other calls between asks. Every answer from the
guest is checked before it is passed on (types, sizes): the guest is not trusted.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from appliance_agent import commands as agent_commands
from appliance_agent import frames

from service.engine import SandboxBusy, SandboxClosed, SandboxLost

from .errors import Busy, Conflict, Invalid, LimitReached, NotFound, SandboxLostError, ServiceError

CALL_TIMEOUT_S = 30.0
POLL_FIRST_S = 0.02
POLL_MAX_S = 0.25
MAX_WAIT_S = 60.0  # one request's wait_s; a client that wants to wait longer asks again
MAX_READ = agent_commands.MAX_READ
MAX_OFFSET = 1 << 62  # a byte offset into a command's output (far past any output a ring has held)
MAX_STDIN = agent_commands.MAX_STDIN
SIGNALS = tuple(agent_commands.SIGNALS)
# Fields of a command's status as the API shows them, with the JSON types the guest's answer must have.
_STATUS_FIELDS: dict[str, tuple[type, ...]] = {
    "command_id": (str,), "pid": (int,), "running": (bool,), "exit_code": (int, type(None)),
    "signal": (str, type(None)), "timed_out": (bool,), "cmd": (str,), "output_bytes": (int,),
    "dropped_bytes": (int,),
}


class Commands:
    def __init__(self, manager, clock=time.monotonic, sleep=time.sleep) -> None:
        self._manager = manager
        self._clock = clock
        self._sleep = sleep

    # ---- one call each -------------------------------------------------------------------------------------------

    def start(self, owner: str, sandbox_id: str, argv: list[str] | None, shell: str | None, cwd: str | None,
              envs: dict[str, str] | None, timeout_s: float | None) -> dict[str, Any]:
        args: dict[str, Any] = {"argv": argv} if argv is not None else {"shell": shell}
        if cwd is not None:
            args["cwd"] = cwd
        if envs:
            args["envs"] = envs
        if timeout_s is not None:
            args["timeout_s"] = timeout_s
        reply = self._call(owner, sandbox_id, "cmd_start", **args)
        return {"command_id": _text(reply.get("command_id")), "pid": _int(reply.get("pid"))}

    def list(self, owner: str, sandbox_id: str) -> list[dict[str, Any]]:
        reply = self._call(owner, sandbox_id, "cmd_list")
        listed = reply.get("commands")
        if not isinstance(listed, list):
            raise ServiceError("the guest answered cmd_list without a list")
        return [_status(item) for item in listed[: agent_commands.MAX_KEPT]]

    def status(self, owner: str, sandbox_id: str, command_id: str, wait_s: float = 0.0) -> dict[str, Any]:
        """The command's status; with wait_s, once it has ended or wait_s has passed."""
        deadline = self._clock() + min(wait_s, MAX_WAIT_S)
        delay = POLL_FIRST_S
        while True:
            status = _status(self._call(owner, sandbox_id, "cmd_status", command_id=command_id).get("status"))
            if not status["running"] or self._clock() >= deadline:
                return status
            self._sleep(min(delay, max(0.0, deadline - self._clock())))
            delay = min(delay * 2, POLL_MAX_S)

    def read(self, owner: str, sandbox_id: str, command_id: str, offset: int, limit: int = MAX_READ,
             wait_s: float = 0.0) -> dict[str, Any]:
        """Output from `offset`; with wait_s, waits until there is some past it, the command ended, or wait_s."""
        deadline = self._clock() + min(wait_s, MAX_WAIT_S)
        delay = POLL_FIRST_S
        while True:
            reply = self._call(owner, sandbox_id, "cmd_read", command_id=command_id, offset=offset, max=limit)
            page = _page(reply, limit)
            if page["chunks"] or not page["status"]["running"] or self._clock() >= deadline:
                return page
            self._sleep(min(delay, max(0.0, deadline - self._clock())))
            delay = min(delay * 2, POLL_MAX_S)

    def send_stdin(self, owner: str, sandbox_id: str, command_id: str, data: bytes, eof: bool) -> dict[str, Any]:
        reply = self._call(owner, sandbox_id, "cmd_stdin", payload=data, command_id=command_id, eof=eof)
        return {"written": _int(reply.get("written"))}

    def signal(self, owner: str, sandbox_id: str, command_id: str, name: str) -> dict[str, Any]:
        return _status(self._call(owner, sandbox_id, "cmd_signal", command_id=command_id, signal=name).get("status"))

    # ---- a command in the foreground -----------------------------------------------------------------------------

    def follow(self, owner: str, sandbox_id: str, command_id: str) -> Iterator[dict[str, Any]]:
        """Output pages of a command until it has ended and its output up to then is read; the last page's status
        is the final one. Closing the iterator early does not stop the command (the caller decides)."""
        offset = 0
        while True:
            page = self.read(owner, sandbox_id, command_id, offset, wait_s=MAX_WAIT_S)
            offset = page["next_offset"]
            yield page
            if not page["status"]["running"] and not page["chunks"]:
                return

    # ---- the wire ------------------------------------------------------------------------------------------------

    def _call(self, owner: str, sandbox_id: str, op: str, payload: bytes = b"", **args: Any) -> dict[str, Any]:
        sandbox = self._manager.commands_sandbox(owner, sandbox_id)
        try:
            reply = sandbox.call_with(op, args, timeout_s=CALL_TIMEOUT_S, payload=payload)
        except SandboxBusy as exc:
            raise Busy(str(exc)) from None
        except (SandboxLost, SandboxClosed) as exc:
            raise SandboxLostError(str(exc)) from None
        if reply.get("ev") == "error":
            code, message = reply.get("code"), str(reply.get("message", "the command call failed"))[:500]
            if code == "not_found":
                raise NotFound(message)
            if code == "too_many":
                raise LimitReached(message, retry_after=1)
            if code == "conflict":
                raise Conflict(message)
            if code == "bad_request":
                raise Invalid(message)
            raise ServiceError(message)
        if reply.get("ev") != "ok":
            raise ServiceError(f"the guest answered {op} with {str(reply.get('ev'))[:40]!r}")
        reply.pop(frames.PAYLOAD_KEY, None)
        return reply


def _text(value: Any, limit: int = 256) -> str:
    if not isinstance(value, str) or len(value) > limit:
        raise ServiceError("the guest's answer has a malformed text field")
    return value


def _int(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ServiceError("the guest's answer has a malformed number")
    return value


def _status(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ServiceError("the guest's answer has no command status")
    status = {}
    for name, types in _STATUS_FIELDS.items():
        field = value.get(name)
        if name not in value or not isinstance(field, types) or (isinstance(field, bool) and bool not in types):
            raise ServiceError(f"the guest's command status has a malformed {name}")
        status[name] = field
    status["cmd"] = status["cmd"][:200]
    return status


def _page(reply: dict[str, Any], limit: int) -> dict[str, Any]:
    chunks, budget = [], limit * 4  # decoded text: at most 4 bytes of UTF-8 per byte read (U+FFFD is 3)
    raw = reply.get("chunks")
    if not isinstance(raw, list):
        raise ServiceError("the guest's output page has no chunks")
    for item in raw:
        if (not isinstance(item, list) or len(item) != 2 or item[0] not in ("stdout", "stderr")
                or not isinstance(item[1], str)):
            raise ServiceError("the guest's output page has a malformed chunk")
        budget -= len(item[1])
        if budget < 0:
            raise ServiceError("the guest's output page is larger than asked for")
        chunks.append({"stream": item[0], "data": item[1]})
    offset, next_offset, dropped = _int(reply.get("offset")), _int(reply.get("next_offset")), _int(
        reply.get("dropped_bytes"))
    if not 0 <= offset <= next_offset or dropped < 0:
        raise ServiceError("the guest's output page has inconsistent offsets")
    return {"chunks": chunks, "offset": offset, "next_offset": next_offset, "dropped_bytes": dropped,
            "status": _status(reply.get("status"))}
