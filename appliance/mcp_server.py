"""The MCP server behind `appliance mcp`: the sandbox tools of appliance.client.tool_specs over the Model Context
Protocol, with the official SDK's low-level Server (it takes our JSON Schemas as they are, so the schemas a model
sees over MCP are the ones the OpenAI/Anthropic/Gemini declarations are rendered from).

Each MCP session has its own ToolSession, so its own default sandbox. A session is what the transport calls one:
the `Mcp-Session-Id` of a streamable-HTTP session (2025 protocol). Requests that carry none (stdio, whose process
serves one client, and 2026-07-28 HTTP requests, which have no sessions by design) share the server's own session.
Every client of one server acts with the server's API key anyway, so sharing adds no reach: any of them could name
any sandbox of that key by id.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anyio
import mcp_types as types
from mcp.server import Server

from .client.errors import ApplianceError
from .client.tool_session import ToolSession
from .client.tool_specs import TOOLS, ToolCallError, json_schema

log = logging.getLogger(__name__)

SERVER_NAME = "appliance"
MAX_SESSIONS = 256  # sessions remembered at once; the oldest is let go (its sandboxes idle out on the service)
INSTRUCTIONS = (
    "Python and bash in an isolated, persistent sandbox VM. The first call without sandbox_id starts this session's "
    "sandbox; state (variables, files) persists between calls. fork copies a sandbox's live state; freeze keeps "
    "one beyond this session."
)


class Sessions:
    """ToolSessions by MCP session key (None: the server's own), at most MAX_SESSIONS of them."""

    def __init__(self, new_session: Callable[[], ToolSession], max_sessions: int = MAX_SESSIONS) -> None:
        self._new_session = new_session
        self._max = max_sessions
        self._sessions: OrderedDict[str | None, ToolSession] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str | None) -> ToolSession:
        with self._lock:
            session = self._sessions.get(key)
            if session is None:
                session = self._sessions[key] = self._new_session()
            self._sessions.move_to_end(key)
            evicted = self._sessions.popitem(last=False)[1] if len(self._sessions) > self._max else None
        if evicted is not None:
            evicted.detach()  # never delete what a live client may come back to; the service idles it out
        return session

    def close(self) -> None:
        """Delete what every session created (except frozen sandboxes): the server is going away."""
        with self._lock:
            sessions = list(self._sessions.values())
            self._sessions.clear()
        with ThreadPoolExecutor(max_workers=8) as pool:  # each close is HTTP round trips: overlap them
            list(pool.map(lambda session: session.close(), sessions))


def session_key(ctx: Any) -> str | None:
    """The transport's session id: the Mcp-Session-Id header of a stateful streamable-HTTP session (the SDK
    answers 404 to an id it did not issue, so a client cannot pick another's), else None."""
    headers = getattr(getattr(ctx, "request", None), "headers", None)
    if headers is None:
        return None
    value = headers.get("mcp-session-id")
    return value[:128] if isinstance(value, str) and value else None


def tool_error(code: str, message: str) -> types.CallToolResult:
    """An MCP tool error: the model sees the code and message (never a traceback)."""
    return types.CallToolResult(
        content=[types.TextContent(type="text", text=f"error {code}: {message}")],
        structured_content={"error": {"code": code, "message": message}}, is_error=True)


def build_server(sessions: Sessions) -> Server:
    tools = [types.Tool(name=t.name, description=t.description, input_schema=json_schema(t)) for t in TOOLS]

    async def list_tools(ctx: Any, params: Any) -> types.ListToolsResult:
        return types.ListToolsResult(tools=tools)

    async def call_tool(ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        session = sessions.get(session_key(ctx))
        try:
            # The SDK is synchronous (httpx): a thread per call keeps other sessions' calls going meanwhile.
            result = await anyio.to_thread.run_sync(session.call, params.name, dict(params.arguments or {}))
        except ToolCallError as exc:
            return tool_error("invalid_arguments", str(exc))
        except ApplianceError as exc:
            return tool_error(exc.code, exc.message)
        except Exception:
            log.exception("tool %s failed", params.name)
            return tool_error("internal", f"{params.name} failed in the MCP server; its log has the details")
        return types.CallToolResult(content=[types.TextContent(type="text", text=result.text)],
                                    structured_content={"sandbox_id": result.sandbox_id})

    return Server(SERVER_NAME, version=_version(), instructions=INSTRUCTIONS, on_list_tools=list_tools,
                  on_call_tool=call_tool)


def serve_stdio(sessions: Sessions) -> None:
    """Until the client closes stdin; then delete what the sessions created. A client that stops its server sends
    SIGTERM soon after (the SDK's waits 2 s): it ends the serving, not the clean-up."""
    from mcp.server.stdio import stdio_server

    server = build_server(sessions)

    async def main() -> None:
        async with stdio_server() as (read_stream, write_stream):
            await server.run(read_stream, write_stream, server.create_initialization_options())

    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        anyio.run(main)
    except* _Stopped:  # raised in whichever task the signal interrupted, so maybe inside a task group's
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
        sessions.close()
        signal.signal(signal.SIGTERM, previous)


def serve_http(sessions: Sessions, host: str, port: int, path: str = "/mcp") -> None:
    """Until SIGINT/SIGTERM; the sessions' sandboxes are deleted as the app shuts down (uvicorn re-raises the
    signal after it, so code after uvicorn.run would never run)."""
    import uvicorn

    server = build_server(sessions)
    app = server.streamable_http_app(streamable_http_path=path, host=host)
    serve_sessions = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app_: Any) -> AsyncIterator[None]:
        try:
            async with serve_sessions(app_):
                yield
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(sessions.close)

    app.router.lifespan_context = lifespan
    uvicorn.run(app, host=host, port=port, log_level="warning")


class _Stopped(Exception):
    """SIGTERM while serving stdio."""


def _stop(signum: int, frame: Any) -> None:
    raise _Stopped


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("appliance")
    except PackageNotFoundError:
        return ""
