"""The rules of a tool session and of `appliance mcp`'s server, on a recording stand-in for the SDK's Sandbox (the
live MCP clients are in tests/integration/test_mcp_live.py): which sandbox a call uses, what a session deletes when
it ends, and how errors reach an MCP client (code and message, never a traceback)."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import anyio
import pytest
from mcp import Client

from appliance.client import Execution, NotFoundError, SandboxBusyError
from appliance.client.tool_session import ToolSession
from appliance.client.tools import run_tool_call
from appliance.mcp_server import Sessions, build_server, session_key


class StandIn:
    """Records what a tool did to it; `missing_files` answer 404 not_found as the API does."""

    def __init__(self, sandbox_id: str, world: dict[str, StandIn]) -> None:
        self.id = sandbox_id
        self.world = world
        self.state = "running"
        self.closed = self.detached = False
        self.codes: list[str] = []
        self.files = SimpleNamespace(read_stream=self._read_stream)
        world[sandbox_id] = self

    def run_code(self, code: str, timeout: float | None = None) -> Execution:
        self.codes.append(code)
        if code == "busy":
            raise SandboxBusyError("an exec is already running in this sandbox", code="sandbox_busy", status=409)
        if code == "crash":
            raise RuntimeError("a bug in the server")
        return Execution(text=repr(len(self.codes)), results=[{"text/plain": repr(len(self.codes))}])

    def _read_stream(self, path: str):
        raise NotFoundError(f"no such file: {path}", code="not_found", status=404)
        yield b""  # a generator, like the SDK's

    def refresh(self) -> dict:
        if self.closed:
            raise NotFoundError("no such sandbox", code="not_found", status=404)
        return {"id": self.id, "state": self.state}

    def freeze(self) -> dict:
        self.state = "frozen"
        return self.refresh()

    def fork(self, n: int) -> list[StandIn]:
        return [StandIn(f"{self.id}-copy{i}", self.world) for i in range(n)]

    def close(self) -> None:
        self.closed = True

    def detach(self) -> None:
        self.detached = True


def session_of(world: dict[str, StandIn], create_s: float = 0.0) -> ToolSession:
    created = iter(range(1000))

    def new_sandbox() -> StandIn:
        time.sleep(create_s)  # a create takes a while (seconds, really): the window two first calls could race in
        return StandIn(f"sb-new{next(created)}", world)

    def connect(sandbox_id: str) -> StandIn:
        if sandbox_id not in world or world[sandbox_id].closed:
            raise NotFoundError("no such sandbox", code="not_found", status=404)
        return world[sandbox_id]

    session = ToolSession(new_sandbox=new_sandbox, connect=connect)
    session.detach_called = False  # type: ignore[attr-defined]
    detach = session.detach

    def recording_detach(keep=None) -> None:
        session.detach_called = True  # type: ignore[attr-defined]
        detach(keep)

    session.detach = recording_detach  # type: ignore[method-assign]
    return session


def test_the_default_sandbox_is_made_on_first_use_once_and_kept():
    world: dict[str, StandIn] = {}
    session = session_of(world, create_s=0.3)
    assert world == {}  # nothing is created before a tool needs it
    threads = [threading.Thread(target=session.call, args=("run_python", {"code": "x"})) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert list(world) == ["sb-new0"] and len(world["sb-new0"].codes) == 4
    assert session.call("run_python", {"code": "y"}).sandbox_id == "sb-new0"


def test_a_missing_file_does_not_lose_the_session_s_sandbox_but_a_missing_sandbox_is_forgotten():
    world: dict[str, StandIn] = {}
    session = session_of(world)
    session.call("run_python", {"code": "x = 1"})
    with pytest.raises(NotFoundError):
        session.call("read_file", {"path": "nope"})
    assert session.default_sandbox_id == "sb-new0"
    world["sb-new0"].closed = True  # idled out on the service
    with pytest.raises(NotFoundError):
        session.call("read_file", {"path": "nope"})
    assert session.call("run_python", {"code": "x"}).text.startswith("[sandbox] started sb-new1")


def test_closing_a_session_deletes_what_it_created_except_frozen_and_only_detaches_the_rest():
    world: dict[str, StandIn] = {}
    other = StandIn("sb-someone-else", world)
    session = session_of(world)
    session.call("run_python", {"code": "x = 1"})
    session.call("fork", {"n": 2})
    session.call("freeze", {"sandbox_id": "sb-new0-copy1"})
    session.call("run_python", {"code": "1", "sandbox_id": other.id})
    session.close()
    assert world["sb-new0"].closed and world["sb-new0-copy0"].closed
    assert not world["sb-new0-copy1"].closed and world["sb-new0-copy1"].detached  # frozen: outlives the session
    assert not other.closed and other.detached


def test_sdk_run_tool_call_reaches_other_sandboxes_by_id_and_lets_go_of_them():
    world: dict[str, StandIn] = {}
    sandbox = StandIn("sb-given", world)
    fork_copy = StandIn("sb-copy", world)
    sandbox.connect_other = lambda sandbox_id: world[sandbox_id]  # type: ignore[attr-defined]
    text = run_tool_call({"name": "run_python", "args": {"code": "1", "sandbox_id": "sb-copy"}}, sandbox)
    assert text == "[result]\n1" and fork_copy.codes == ["1"] and sandbox.codes == []
    assert fork_copy.detached and not fork_copy.closed and not sandbox.detached


def _call(server_sessions: Sessions, name: str, arguments: dict):
    async def call():
        async with Client(build_server(server_sessions)) as client:
            return await client.call_tool(name, arguments)

    return anyio.run(call)


@pytest.mark.parametrize(
    ("name", "arguments", "code", "says"),
    [
        ("run_python", {"code": "busy"}, "sandbox_busy", "an exec is already running"),
        ("read_file", {"path": "/data/x"}, "not_found", "no such file: /data/x"),
        ("run_python", {"code": "1", "sandbox_id": "sb-nobody"}, "not_found", "no such sandbox"),
        ("run_python", {"code": "1", "sandbox_id": "../../metrics"}, "invalid_arguments", "not a sandbox id"),
        ("fork", {"n": 99}, "invalid_arguments", "'n' must be at most 16"),
        ("rm_rf", {}, "invalid_arguments", "unknown tool 'rm_rf'"),
        ("run_python", {"code": "crash"}, "internal", "run_python failed in the MCP server"),
    ],
)
def test_errors_reach_the_mcp_client_as_tool_errors_with_a_code(name, arguments, code, says):
    world: dict[str, StandIn] = {}
    result = _call(Sessions(lambda: session_of(world)), name, arguments)
    assert result.is_error
    assert result.structured_content == {"error": {"code": code, "message": result.structured_content["error"]
                                                   ["message"]}}
    text = result.content[0].text
    assert text.startswith(f"error {code}: ") and says in text and "Traceback" not in text


def test_mcp_sessions_are_told_apart_by_the_transport_s_session_id():
    made: list[ToolSession] = []
    sessions = Sessions(lambda: made.append(session_of({})) or made[-1], max_sessions=2)
    assert session_key(SimpleNamespace(request=None)) is None  # stdio, sessionless HTTP: the server's own
    headers = {"mcp-session-id": "abc"}
    assert session_key(SimpleNamespace(request=SimpleNamespace(headers=headers))) == "abc"
    first_a, server_s = sessions.get("a"), sessions.get(None)
    assert sessions.get("a") is first_a and first_a is not server_s
    sessions.get("b")  # a third session: the least recently used one (the server's own) is let go
    assert made[1].detach_called and not first_a.detach_called  # type: ignore[attr-defined]
    assert sessions.get(None) is not server_s and sessions.get("b") is made[2]
