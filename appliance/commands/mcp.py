"""`appliance mcp`: serve the sandbox tools to MCP clients (Claude Desktop, IDEs, agent frameworks) over stdio or
streamable HTTP, against a local or remote execution API (--url/--key as for `appliance sandboxes`)."""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

import click

from .sandboxes import Target, connection_options, http_client

if TYPE_CHECKING:
    from appliance.mcp_server import Sessions

_LOOPBACK_NAMES = ("localhost",)


@click.command("mcp")
@click.option("--transport", type=click.Choice(["stdio", "http"]), default="stdio", show_default=True,
              help="stdio: the client starts this command and talks over its stdin/stdout; http: streamable HTTP.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (http).")
@click.option("--port", type=click.IntRange(1, 65535), default=8811, show_default=True, help="Port (http).")
@connection_options
def mcp_command(target: Target, transport: str, host: str, port: int) -> None:
    """Serve run_python, run_command, files, fork, freeze/resume and close as MCP tools."""
    try:
        from appliance import mcp_server
    except ImportError as exc:  # the `mcp` package is a dependency; a broken install says so in one line
        raise click.ClickException(f"the MCP SDK is not installed ({exc}); pip install 'mcp>=2.3'") from None
    sessions = _sessions(target)
    if transport == "stdio":
        mcp_server.serve_stdio(sessions)
        return
    if not _is_loopback(host):
        click.echo(f"warning: {host} is not a loopback address: whoever reaches port {port} uses the API key of "
                   "this server (MCP over HTTP has no key of its own here)", err=True)
    click.echo(f"MCP (streamable HTTP) on http://{_url_host(host)}:{port}/mcp for the API at {target.url}", err=True)
    mcp_server.serve_http(sessions, host, port)


def _sessions(target: Target) -> Sessions:
    from appliance.client import Sandbox
    from appliance.client.tool_session import ToolSession
    from appliance.mcp_server import Sessions

    client = http_client(target)  # one pool of connections for every sandbox of every session (thread-safe)

    def new_session() -> ToolSession:
        return ToolSession(
            new_sandbox=lambda: Sandbox(url=target.url, api_key=target.key, http_client=client),
            connect=lambda sandbox_id: Sandbox.connect(sandbox_id, url=target.url, api_key=target.key,
                                                       http_client=client),
        )

    return Sessions(new_session)


def _is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
