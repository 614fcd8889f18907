"""`appliance sandboxes list|freeze|resume|rm`: an operator's view of a running service's sandboxes, via its API.

The commands talk to the local API through the SDK, as any client would, with one key: the sandboxes they see are
that key's (the API has no cross-key view). URL: --url, else $APPLIANCE_URL, else the spec's service.host/port.
Key: --key, else $APPLIANCE_API_KEY, else the service's own key ($APPLIANCE_API_KEYS, the spec's service.api_keys,
or the key file `appliance serve` writes in the state directory).
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ..spec import load_spec
from .options import spec_option

if TYPE_CHECKING:
    import httpx

STATES = ("running", "frozen", "lost")
_REQUEST_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Target:
    url: str
    key: str


def connection_options(command: Callable) -> Callable:
    @click.option("--url", envvar="APPLIANCE_URL", default=None,
                  help="API URL (default: $APPLIANCE_URL, else the spec's service.host and service.port).")
    @click.option("--key", envvar="APPLIANCE_API_KEY", default=None,
                  help="API key (default: $APPLIANCE_API_KEY, else the service's own key from its environment, "
                       "spec or key file).")
    @spec_option
    @functools.wraps(command)
    def wrapper(url: str | None, key: str | None, spec_path: Path | None, **kwargs: Any) -> Any:
        return command(target=resolve_target(url, key, spec_path), **kwargs)

    return wrapper


def resolve_target(url: str | None, key: str | None, spec_path: Path | None) -> Target:
    if url and key:
        return Target(url.rstrip("/"), key)
    spec = load_spec(spec_path)
    if not url:
        host = spec.service.host
        host = "127.0.0.1" if host in ("", "0.0.0.0") else "[::1]" if host == "::" else host
        url = f"http://{host}:{spec.service.port}"
    return Target(url.rstrip("/"), key or _service_key(spec))


def _service_key(spec) -> str:
    """The key the local service accepts, found where `appliance serve` looks for it (never created here)."""
    from service import settings

    try:
        key = settings.service_key(spec)
    except OSError as exc:
        raise click.ClickException(
            f"cannot read the API key file {settings.key_file(spec)}: {exc.strerror}; pass --key, or run as the "
            "service's user"
        ) from None
    if key is None:
        raise click.ClickException(
            f"no API key: none in --key or $APPLIANCE_API_KEY, and no key file at {settings.key_file(spec)} (has "
            "`appliance serve` run with this state directory?)"
        )
    return key


def http_client(target: Target) -> httpx.Client:
    """The connection every call of one command shares (tests swap this for an in-process transport)."""
    import httpx  # not at import time: every `appliance` command loads this module

    from appliance.client import tls

    try:  # https: APPLIANCE_CA_BUNDLE / APPLIANCE_TLS_PIN, as the SDK
        verify = tls.httpx_verify(target.url)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    return httpx.Client(base_url=target.url, timeout=_REQUEST_TIMEOUT_S, verify=verify)


def _one_line(target: Target, exc: Exception) -> str:
    from appliance.client import ConnectionFailed

    if isinstance(exc, ConnectionFailed):
        return f"cannot reach the API at {target.url}; is `appliance serve` running there? ({exc.message})"
    message = getattr(exc, "message", None) or str(exc)
    return message.splitlines()[0] if message else type(exc).__name__


@click.group("sandboxes")
def sandboxes_group() -> None:
    """List, freeze, resume and delete sandboxes of a running service (the ones its key owns)."""


@sandboxes_group.command("list")
@click.option("--state", type=click.Choice(STATES), default=None, help="Only sandboxes in this state.")
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON instead of a table.")
@connection_options
def list_command(target: Target, state: str | None, as_json: bool) -> None:
    """List sandboxes: id, state, size, when last used, what happens when idle."""
    from appliance.client import ApplianceError, Sandbox

    with http_client(target) as client:
        try:
            sandboxes = Sandbox.list(url=target.url, api_key=target.key, state=state, http_client=client)
        except ApplianceError as exc:
            raise click.ClickException(_one_line(target, exc)) from None
    if as_json:
        click.echo(json.dumps(sandboxes, indent=2))
        return
    if not sandboxes:
        click.echo(f"no {state + ' ' if state else ''}sandboxes", err=True)
        return
    click.echo(format_table(sandboxes, now=time.time()))


def format_table(sandboxes: list[dict[str, Any]], now: float) -> str:
    header = ("ID", "STATE", "VCPUS", "MEMORY", "LAST USED", "WHEN IDLE", "FORKED FROM")
    rows = [header]
    for sb in sandboxes:
        idle = "-"  # a frozen or lost sandbox stays until deleted
        if sb["state"] == "running":
            idle = f"{'freeze' if sb.get('persistent') else 'close'} after {_duration(sb['timeout_s'])}"
        rows.append((
            sb["id"], sb["state"], str(sb.get("vcpus") or "-"),
            f"{sb['memory_mib']} MiB" if sb.get("memory_mib") else "-",
            _ago(sb.get("last_active_at"), now), idle, (sb.get("metadata") or {}).get("forked_from", "-"),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
                     for row in rows)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _ago(stamp: str | None, now: float) -> str:
    if not stamp:
        return "-"
    try:
        then = datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return stamp
    seconds = max(0, int(now - then))
    if seconds < 60:
        return f"{seconds}s ago"
    if seconds < 3600:
        return f"{seconds // 60}m ago"
    if seconds < 86400:
        return f"{seconds // 3600}h ago"
    return f"{seconds // 86400}d ago"


def _each(target: Target, ids: tuple[str, ...], action: Callable[[Any], str]) -> None:
    """Apply `action` to every sandbox; one line per sandbox, one line per failure, exit 1 if any failed."""
    from appliance.client import ApplianceError, Sandbox

    failures = []
    with http_client(target) as client:
        for sandbox_id in ids:
            try:
                sandbox = Sandbox.connect(sandbox_id, url=target.url, api_key=target.key, http_client=client,
                                          request_timeout=_REQUEST_TIMEOUT_S)
                click.echo(f"{sandbox_id} {action(sandbox)}")
            except ApplianceError as exc:
                failures.append(f"{sandbox_id}: {_one_line(target, exc)}")
    if len(failures) == 1 and len(ids) == 1:
        raise click.ClickException(failures[0])
    for failure in failures:
        click.echo(f"Error: {failure}", err=True)
    if failures:
        raise click.ClickException(f"{len(failures)} of {len(ids)} sandboxes failed")


@sandboxes_group.command("freeze")
@click.argument("ids", nargs=-1, required=True)
@connection_options
def freeze_command(target: Target, ids: tuple[str, ...]) -> None:
    """Freeze sandboxes to disk: their VMs stop and free their memory; the next call resumes them."""
    _each(target, ids, lambda sb: sb.freeze()["state"])


@sandboxes_group.command("resume")
@click.argument("ids", nargs=-1, required=True)
@connection_options
def resume_command(target: Target, ids: tuple[str, ...]) -> None:
    """Resume frozen sandboxes now (a call on one would resume it anyway)."""
    _each(target, ids, lambda sb: sb.resume()["state"])


@sandboxes_group.command("rm")
@click.argument("ids", nargs=-1, required=True)
@connection_options
def rm_command(target: Target, ids: tuple[str, ...]) -> None:
    """Delete sandboxes: running ones stop, frozen ones lose their snapshot. There is no undo."""

    def delete(sandbox) -> str:
        sandbox.close()
        return "deleted"

    _each(target, ids, delete)
