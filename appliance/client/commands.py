"""Commands beside the REPL, in the SDK (names as the hosted code interpreters use them):

    result = sb.commands.run("make -j2")                       # to its end: CommandResult(stdout, stderr, exit_code)
    server = sb.commands.run(["python3", "-m", "http.server", "8000"], background=True)
    server.send_stdin("...")                                   # its stdin
    for piece in server.output(): ...                          # pieces of output as they come (reconnects resume)
    server.kill()                                              # SIGKILL (or .signal("SIGTERM")); .wait() -> result
    sb.commands.list()                                         # statuses of the sandbox's commands
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from .sandbox import Sandbox

# The service answers a wait of at most this long; longer waits ask again.
_WAIT_SLICE_S = 30.0


@dataclass
class CommandResult:
    stdout: str
    stderr: str
    exit_code: int | None
    error: Any = None  # an ExecutionError for a command that failed (non-zero exit, signal, timeout)
    signal: str | None = None
    timed_out: bool = False
    dropped_bytes: int = 0


def _result(data: dict[str, Any], stdout: str, stderr: str) -> CommandResult:
    from .sandbox import ExecutionError

    exit_code, signal = data.get("exit_code"), data.get("signal")
    error = None
    if data.get("timed_out"):
        error = ExecutionError("TimeoutError", "the command exceeded its timeout and was killed", "")
    elif signal:
        error = ExecutionError("CalledProcessError", f"the command was killed by {signal}", "")
    elif exit_code:
        error = ExecutionError("CalledProcessError", f"the command exited with code {exit_code}", "")
    return CommandResult(stdout, stderr, exit_code, error, signal, bool(data.get("timed_out")),
                         int(data.get("dropped_bytes") or 0))


class CommandHandle:
    """A command running in the background. `offset` is how far output() has read: a new handle (another
    process, after a reconnect) can start from any offset."""

    def __init__(self, sandbox: Sandbox, command_id: str, pid: int | None = None, offset: int = 0) -> None:
        self._sandbox = sandbox
        self.command_id = command_id
        self.pid = pid
        self.offset = offset

    def _path(self, suffix: str = "") -> str:
        return self._sandbox._path(f"/commands/{self.command_id}{suffix}")

    def _request(self, method: str, path: str, wait_s: float = 0.0, **kwargs: Any) -> dict[str, Any]:
        timeout = httpx.Timeout(self._sandbox._request_timeout, read=self._sandbox._request_timeout + wait_s)
        return self._sandbox._api.request(method, path, timeout=timeout, **kwargs).json()

    def status(self, wait_s: float = 0.0) -> dict[str, Any]:
        """{command_id, pid, running, exit_code, signal, timed_out, ...}; with wait_s, once it has ended."""
        params = {"wait_s": wait_s} if wait_s else None
        return self._request("GET", self._path(), wait_s, params=params)

    def read(self, offset: int | None = None, wait_s: float = 0.0, max_bytes: int | None = None) -> dict[str, Any]:
        """One page of output from `offset` (default: where this handle is): {chunks: [{stream, data}], offset,
        next_offset, dropped_bytes, status}. Moves the handle's offset on."""
        params: dict[str, Any] = {"offset": self.offset if offset is None else offset}
        if wait_s:
            params["wait_s"] = wait_s
        if max_bytes is not None:
            params["max"] = max_bytes
        page = self._request("GET", self._path("/output"), wait_s, params=params)
        self.offset = page["next_offset"]
        return page

    def output(self) -> Iterator[dict[str, Any]]:
        """Pieces of output ({stream, data}) from the handle's offset until the command ends."""
        while True:
            page = self.read(wait_s=_WAIT_SLICE_S)
            yield from page["chunks"]
            if not page["status"]["running"] and not page["chunks"]:
                return

    def send_stdin(self, data: str, eof: bool = False) -> int:
        """Write text to its stdin; eof=True closes stdin after it. Returns the bytes written."""
        return self._request("POST", self._path("/stdin"), json={"data": data, "eof": eof})["written"]

    def close_stdin(self) -> None:
        self.send_stdin("", eof=True)

    def signal(self, name: str = "SIGTERM") -> dict[str, Any]:
        return self._request("POST", self._path("/signal"), json={"signal": name})

    def kill(self) -> dict[str, Any]:
        return self.signal("SIGKILL")

    def wait(self, timeout: float | None = None) -> CommandResult:
        """Wait for its end (TimeoutError after `timeout` seconds); its result, with the output from the
        handle's offset on (what the ring still holds)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        stdout, stderr = [], []
        while True:
            remaining = _WAIT_SLICE_S if deadline is None else max(0.0, min(_WAIT_SLICE_S,
                                                                             deadline - time.monotonic()))
            page = self.read(wait_s=remaining)
            for chunk in page["chunks"]:
                (stdout if chunk["stream"] == "stdout" else stderr).append(chunk["data"])
            if not page["status"]["running"] and not page["chunks"]:
                return _result(page["status"], "".join(stdout), "".join(stderr))
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"command {self.command_id} still runs after {timeout} s")

    def __repr__(self) -> str:
        return f"CommandHandle({self.command_id!r}, pid={self.pid})"


class Commands:
    def __init__(self, sandbox: Sandbox) -> None:
        self._sandbox = sandbox

    def run(self, cmd: str | list[str], *, background: bool = False, cwd: str | None = None,
            envs: dict[str, str] | None = None, timeout: float | None = None) -> Any:
        """Run a command beside the REPL: a shell line (bash -c) or an argv list. In the foreground (the default)
        it returns a CommandResult when it ends; with background=True, a CommandHandle at once."""
        body: dict[str, Any] = {"cmd": cmd, "background": background}
        for name, value in (("cwd", cwd), ("envs", envs), ("timeout_s", timeout)):
            if value is not None:
                body[name] = value
        api, base = self._sandbox._api, self._sandbox._request_timeout
        if background:
            started = api.request("POST", self._sandbox._path("/commands"), json=body).json()
            return CommandHandle(self._sandbox, started["command_id"], started.get("pid"))
        wait = httpx.Timeout(base, read=(timeout or 600.0) + 30.0)
        data = api.request("POST", self._sandbox._path("/commands"), json=body, timeout=wait).json()
        return _result(data, data.get("stdout", ""), data.get("stderr", ""))

    def connect(self, command_id: str, offset: int = 0) -> CommandHandle:
        """A handle on a command started earlier (by this or another client), reading from `offset`."""
        return CommandHandle(self._sandbox, command_id, offset=offset)

    def list(self) -> list[dict[str, Any]]:
        return self._sandbox._api.request("GET", self._sandbox._path("/commands")).json()["commands"]
