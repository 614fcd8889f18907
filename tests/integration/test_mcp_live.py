"""`appliance mcp` as an MCP client reaches it: the installed command, started by the `mcp` SDK's own clients (stdio,
and streamable HTTP), against a real `appliance serve` (gunicorn, real microVMs) shared by this module.

What a user of Claude Desktop or an agent framework relies on: the tools are listed with the shared schemas, code runs
and its state persists within the session, files and commands work, fork copies state, API errors and bad arguments
come back as tool errors with the API's code (never a traceback), and the server deletes the sandboxes it created
when the client goes away (a frozen one outlives it).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator

import anyio
import httpx
import pytest
from mcp import Client, StdioServerParameters

from appliance.client.tool_specs import TOOLS
from tests.live_service import LiveService, appliance_entry_point, free_port

pytestmark = pytest.mark.integration

HANG_DEADLINE_S = 120  # only a hang reaches this: a create or exec under TCG takes seconds


@pytest.fixture(scope="module")
def live() -> Iterator[LiveService]:
    service = LiveService(workers=1, pool_size=1, env_extra={"APPLIANCE_SERVICE__WARM_CODE": "x = 0"})
    service.start()
    try:
        yield service
    finally:
        service.stop()


def _client_env(live: LiveService) -> dict[str, str]:
    """What an MCP client's config gives the server: where the API is and the key (nothing else of ours)."""
    return {"APPLIANCE_URL": live.url, "APPLIANCE_API_KEY": live.key, "PATH": os.environ.get("PATH", "")}


def _text(result) -> str:
    return "\n".join(block.text for block in result.content if block.type == "text")


def _state(live: LiveService, sandbox_id: str) -> str | int:
    response = httpx.get(f"{live.url}/v1/sandboxes/{sandbox_id}", headers=live.headers(), timeout=HANG_DEADLINE_S)
    return response.json()["state"] if response.status_code == 200 else response.status_code


def test_stdio_client_lists_the_tools_runs_code_and_gets_api_errors_as_tool_errors(live):
    params = StdioServerParameters(command=str(appliance_entry_point()), args=["mcp"], env=_client_env(live))
    seen: dict[str, str] = {}

    async def session() -> None:
        with anyio.fail_after(4 * HANG_DEADLINE_S):
            async with Client(params, read_timeout_seconds=HANG_DEADLINE_S) as client:
                listed = await client.list_tools()
                by_name = {tool.name: tool for tool in listed.tools}
                assert list(by_name) == [tool.name for tool in TOOLS]
                assert by_name["run_python"].input_schema["required"] == ["code"]

                first = await client.call_tool("run_python", {"code": "x = 6 * 7\nimport os\nos.getpid() > 0"})
                assert not first.is_error, _text(first)
                seen["sandbox"] = first.structured_content["sandbox_id"]
                assert f"[sandbox] started {seen['sandbox']}" in _text(first)
                again = await client.call_tool("run_python", {"code": "print(x)"})  # same session, same sandbox
                assert _text(again) == "[stdout]\n42" and again.structured_content["sandbox_id"] == seen["sandbox"]

                wrote = await client.call_tool("write_file", {"path": "notes/a.txt", "content": "héllo\n"})
                assert not wrote.is_error and "wrote 7 bytes" in _text(wrote)
                read = await client.call_tool("read_file", {"path": "/data/notes/a.txt"})
                assert _text(read) == "héllo\n"
                listing = await client.call_tool("list_files", {"path": "notes"})
                assert "a.txt" in _text(listing)
                command = await client.call_tool("run_command", {"command": "wc -c < notes/a.txt; exit 3"})
                assert _text(command) == "[stdout]\n7\n[exit code] 3"

                missing = await client.call_tool("read_file", {"path": "/data/no-such-file"})
                assert missing.is_error and missing.structured_content["error"]["code"] == "not_found"
                assert _text(missing).startswith("error not_found: ") and "Traceback" not in _text(missing)
                stranger = await client.call_tool("run_python", {"code": "1", "sandbox_id": "sb-0000000000000000"})
                assert stranger.is_error and stranger.structured_content["error"]["code"] == "not_found"
                bad = await client.call_tool("run_python", {"code": 5})
                assert bad.is_error and bad.structured_content["error"]["code"] == "invalid_arguments"
                assert "'code' must be a string" in _text(bad)
                still = await client.call_tool("run_python", {"code": "x"})  # errors left the session as it was
                assert _text(still) == "[result]\n42"

    anyio.run(session)
    # The client went away: the server deleted the sandbox it had started for it.
    assert _state(live, seen["sandbox"]) == 404


@contextlib.contextmanager
def _http_server(live: LiveService) -> Iterator[tuple[subprocess.Popen, str]]:
    port = free_port()
    env = {**os.environ, **_client_env(live)}
    process = subprocess.Popen([str(appliance_entry_point()), "mcp", "--transport", "http", "--port", str(port)],
                               env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        deadline = time.monotonic() + HANG_DEADLINE_S
        while True:
            assert process.poll() is None, process.communicate()
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            assert time.monotonic() < deadline, "appliance mcp --transport http never listened"
            time.sleep(0.1)
        yield process, f"http://127.0.0.1:{port}/mcp"
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=HANG_DEADLINE_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def test_streamable_http_client_forks_and_freezes_and_the_server_cleans_up_on_exit(live):
    seen: dict[str, str] = {}
    with _http_server(live) as (process, url):
        async def session() -> None:
            with anyio.fail_after(4 * HANG_DEADLINE_S):
                async with Client(url, read_timeout_seconds=HANG_DEADLINE_S) as client:
                    assert {tool.name for tool in (await client.list_tools()).tools} == {t.name for t in TOOLS}
                    first = await client.call_tool("run_python", {"code": "import random\nx = 41"})
                    assert not first.is_error, _text(first)
                    seen["default"] = first.structured_content["sandbox_id"]
                    forked = await client.call_tool("fork", {"n": 1})
                    assert not forked.is_error, _text(forked)
                    seen["copy"] = _text(forked).rsplit(" ", 1)[-1]
                    in_copy = await client.call_tool("run_python", {"code": "x += 1\nx", "sandbox_id": seen["copy"]})
                    assert _text(in_copy) == "[result]\n42"
                    assert _text(await client.call_tool("run_python", {"code": "x"})) == "[result]\n41"
                    frozen = await client.call_tool("freeze", {"sandbox_id": seen["copy"]})
                    assert not frozen.is_error and "is frozen" in _text(frozen)
                    too_many = await client.call_tool("fork", {"n": 1000})
                    assert too_many.is_error and "'n' must be at most 16" in _text(too_many)

        anyio.run(session)
        assert _state(live, seen["default"]) == "running"  # the server still serves; its sessions keep theirs
    # uvicorn re-raises the SIGTERM it stopped on (after the app's shutdown), as a service should
    assert process.returncode in (0, -signal.SIGTERM), process.stderr.read() if process.stderr else ""
    # Stopped: it deleted the sandbox it had started; the frozen copy outlives it.
    assert _state(live, seen["default"]) == 404
    assert _state(live, seen["copy"]) == "frozen"
    httpx.delete(f"{live.url}/v1/sandboxes/{seen['copy']}", headers=live.headers(), timeout=HANG_DEADLINE_S)
