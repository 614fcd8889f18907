#!/usr/bin/env python3
"""An MCP client session against `appliance mcp`, with the `mcp` SDK's own client: list the tools, run code, fork.

    APPLIANCE_URL=http://127.0.0.1:8080 APPLIANCE_API_KEY=... python examples/mcp_client.py          # stdio
    python examples/mcp_client.py --url http://127.0.0.1:8811/mcp     # an `appliance mcp --transport http` server

With stdio it starts `appliance mcp` itself (as Claude Desktop or an IDE does); the environment carries the API's
URL and key.
"""

from __future__ import annotations

import argparse
import os
import shutil

import anyio
from mcp import Client, StdioServerParameters


def _text(result) -> str:
    return "\n".join(block.text for block in result.content if block.type == "text")


async def main(url: str | None) -> None:
    server: str | StdioServerParameters = url or StdioServerParameters(
        command=shutil.which("appliance") or "appliance", args=["mcp"],
        env={name: os.environ[name] for name in ("APPLIANCE_URL", "APPLIANCE_API_KEY") if name in os.environ})
    async with Client(server, read_timeout_seconds=600) as client:
        tools = (await client.list_tools()).tools
        print("tools:", ", ".join(tool.name for tool in tools))
        for name, arguments in [
            ("run_python", {"code": "squares = [i * i for i in range(10)]\nsum(squares)"}),
            ("run_python", {"code": "print(squares[-3:])"}),
            ("run_command", {"command": "python3 --version; nproc"}),
            ("write_file", {"path": "hello.txt", "content": "hi from MCP\n"}),
            ("read_file", {"path": "hello.txt"}),
            ("fork", {"n": 1}),
            ("read_file", {"path": "/no/such/file"}),
        ]:
            result = await client.call_tool(name, arguments)
            print(f"\n> {name} {arguments}{'  (tool error)' if result.is_error else ''}\n{_text(result)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a streamable-HTTP MCP endpoint (default: start `appliance mcp` over stdio)")
    anyio.run(main, parser.parse_args().url)
