"""/v1/sandboxes/{id}/commands: programs run beside the REPL (issue 15), in the background with a handle or in the
foreground with their output streamed like an exec's.

    POST /commands                      start {cmd, cwd, envs, background, timeout_s}
    GET  /commands                      list (running and finished, newest last)
    GET  /commands/{cid}[?wait_s=]      status; with wait_s, once it has ended (or wait_s passed)
    GET  /commands/{cid}/output?offset=N[&max=][&wait_s=]   output from byte offset N (a reconnect reads on)
    POST /commands/{cid}/stdin          {data, eof}
    POST /commands/{cid}/signal         {signal}: one of an allow-list, to its process group
The service's logic is in service/commands.py; the agent's in appliance_agent/commands.py.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Iterator
from typing import Any

import falcon

from service.commands import MAX_OFFSET, MAX_READ, MAX_STDIN, MAX_WAIT_S, Commands
from service.errors import TooLarge

from .error_responses import InvalidField
from .exec import NDJSON
from .request_models import CommandRequest, SignalRequest, StdinRequest, parse, read_json

log = logging.getLogger("appliance.api")
MAX_COMMAND_ID = 64


def _wait_s(req: falcon.Request) -> float:
    raw = req.get_param("wait_s")
    if raw is None:
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or not 0 <= value <= MAX_WAIT_S:
        raise InvalidField("wait_s", f"must be a number of seconds from 0 to {MAX_WAIT_S:g}")
    return value


def _int_param(req: falcon.Request, name: str, default: int, low: int, high: int) -> int:
    raw = req.get_param(name)
    if raw is None:
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise InvalidField(name, f"must be an integer from {low} to {high}")
    return int(raw)


def _command_id(command_id: str) -> str:
    if len(command_id) > MAX_COMMAND_ID or not command_id.isascii():
        raise InvalidField("command_id", "is not a command id (cmd-N)")
    return command_id


def _line(event: dict[str, Any]) -> bytes:
    return json.dumps(event, ensure_ascii=False).encode() + b"\n"


class CommandCollection:
    def __init__(self, commands: Commands, max_body_bytes: int) -> None:
        self._commands = commands
        self._max_body = max_body_bytes

    def on_post(self, req: falcon.Request, resp: falcon.Response, sandbox_id: str) -> None:
        body = parse(CommandRequest, read_json(req, self._max_body))
        owner = req.context.owner
        argv, shell = (body.cmd, None) if isinstance(body.cmd, list) else (None, body.cmd)
        started = self._commands.start(owner, sandbox_id, argv, shell, body.cwd, body.envs, body.timeout_s)
        if body.background:
            resp.status = falcon.HTTP_201
            resp.location = f"{req.path}/{started['command_id']}"
            resp.media = started
            return
        pages = self._commands.follow(owner, sandbox_id, started["command_id"])
        if req.client_prefers(["application/json", NDJSON]) == NDJSON:
            resp.content_type = NDJSON
            resp.stream = self._stream(owner, sandbox_id, started, pages)
            return
        stdout, stderr, status, dropped = [], [], None, 0
        for page in pages:
            dropped += page["dropped_bytes"]
            for chunk in page["chunks"]:
                (stdout if chunk["stream"] == "stdout" else stderr).append(chunk["data"])
            status = page["status"]
        resp.media = {**started, "stdout": "".join(stdout), "stderr": "".join(stderr), "dropped_bytes": dropped,
                      **_final(status)}

    def _stream(self, owner: str, sandbox_id: str, started: dict[str, Any],
                pages: Iterator[dict[str, Any]]) -> Iterator[bytes]:
        status, dropped, finished = None, 0, False
        yield _line({"type": "started", **started})
        try:
            for page in pages:
                dropped += page["dropped_bytes"]
                for chunk in page["chunks"]:
                    yield _line({"type": chunk["stream"], "data": chunk["data"]})
                status = page["status"]
            finished = True
        except Exception as exc:  # the status line is gone: say so in the last line instead
            log.exception("command stream of %s failed", sandbox_id)
            yield _line({"type": "error", "error": {"code": getattr(exc, "code", "internal"),
                                                    "message": str(exc)[:500]}})
            return
        finally:
            if not finished:  # the client went away: a foreground command does not run on for nobody
                with contextlib.suppress(Exception):
                    self._commands.signal(owner, sandbox_id, started["command_id"], "SIGKILL")
            with contextlib.suppress(Exception):
                pages.close()  # type: ignore[attr-defined]
        yield _line({"type": "done", **started, "dropped_bytes": dropped, **_final(status)})

    def on_get(self, req: falcon.Request, resp: falcon.Response, sandbox_id: str) -> None:
        resp.media = {"commands": self._commands.list(req.context.owner, sandbox_id)}


def _final(status: dict[str, Any] | None) -> dict[str, Any]:
    status = status or {}
    return {"exit_code": status.get("exit_code"), "signal": status.get("signal"),
            "timed_out": status.get("timed_out", False)}


class CommandItem:
    def __init__(self, commands: Commands) -> None:
        self._commands = commands

    def on_get(self, req: falcon.Request, resp: falcon.Response, sandbox_id: str, command_id: str) -> None:
        resp.media = self._commands.status(req.context.owner, sandbox_id, _command_id(command_id), _wait_s(req))


class CommandOutput:
    def __init__(self, commands: Commands) -> None:
        self._commands = commands

    def on_get(self, req: falcon.Request, resp: falcon.Response, sandbox_id: str, command_id: str) -> None:
        offset = _int_param(req, "offset", 0, 0, MAX_OFFSET)
        limit = _int_param(req, "max", MAX_READ, 1, MAX_READ)
        resp.media = self._commands.read(req.context.owner, sandbox_id, _command_id(command_id), offset, limit,
                                         _wait_s(req))


class CommandStdin:
    def __init__(self, commands: Commands, max_body_bytes: int) -> None:
        self._commands = commands
        self._max_body = max_body_bytes

    def on_post(self, req: falcon.Request, resp: falcon.Response, sandbox_id: str, command_id: str) -> None:
        body = parse(StdinRequest, read_json(req, self._max_body))
        data = body.data.encode("utf-8", "replace")
        if len(data) > MAX_STDIN:
            raise TooLarge(f"one stdin write is at most {MAX_STDIN} bytes; send it in parts")
        resp.media = self._commands.send_stdin(req.context.owner, sandbox_id, _command_id(command_id), data,
                                               body.eof)


class CommandSignal:
    def __init__(self, commands: Commands, max_body_bytes: int) -> None:
        self._commands = commands
        self._max_body = max_body_bytes

    def on_post(self, req: falcon.Request, resp: falcon.Response, sandbox_id: str, command_id: str) -> None:
        body = parse(SignalRequest, read_json(req, self._max_body))
        resp.status = falcon.HTTP_202
        resp.media = self._commands.signal(req.context.owner, sandbox_id, _command_id(command_id), body.signal)
