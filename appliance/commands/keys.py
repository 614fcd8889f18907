"""`appliance keys add|list|rotate|revoke`: the API keys of this node's service, in its key store
(`<state_dir>/keys.json`, service/keys.py). The running service sees every change without a restart.

A key is printed once, by `add` or `rotate`; the store keeps only its HMAC under the deployment secret. Run as the
service's user or as root (files keep the state directory's owner). In a fleet, every node has the same secret, so
the same store file is valid on every node.
"""

from __future__ import annotations

import json
import os
import re
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from ..spec import load_spec
from .options import spec_option

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"^(\d+)([smhdw])$")


def parse_duration(text: str) -> float:
    """`90s`, `30m`, `1h`, `7d`, `2w` → seconds."""
    found = _DURATION.match(text.strip())
    if not found:
        raise click.BadParameter(f"{text!r}: a number and a unit (s, m, h, d, w), e.g. 1h or 90d")
    return int(found.group(1)) * _UNITS[found.group(2)]


def parse_expiry(text: str, now: float) -> float:
    """A duration from now (`90d`) or a date (`2027-01-31`, `2027-01-31T12:00`, UTC unless it says otherwise)."""
    if _DURATION.match(text.strip()):
        return now + parse_duration(text)
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r}: a duration (90d) or a date (2027-01-31)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    if when.timestamp() <= now:
        raise click.BadParameter(f"{text!r} is in the past")
    return when.timestamp()


def _store(spec_path: Path | None):
    """The key store of the spec's state directory, with the deployment secret (the service's user's, when run as
    root)."""
    from service import settings
    from service.engine.deployment_secret import SecretError, read_or_create
    from service.keys import KeyStore

    spec = load_spec(spec_path)
    state_dir = spec.paths.state_dir
    owner = state_dir.stat().st_uid if state_dir.exists() else os.geteuid()
    try:
        secret = read_or_create(settings.secret_file(spec), owner=owner)
    except SecretError as exc:
        raise click.ClickException(f"{exc}; run as the service's user or as root") from None
    return spec, KeyStore(state_dir, secret), secret


def _errors():
    from service.keys import KeyStoreError

    return KeyStoreError


def _when(stamp: float | None) -> str:
    if stamp is None:
        return "-"
    return datetime.fromtimestamp(stamp, tz=UTC).strftime("%Y-%m-%d %H:%M UTC")


def status(entry: dict[str, Any], now: float) -> str:
    if entry["revoked"] is not None:
        return f"revoked {_when(entry['revoked'])}"
    if entry["expires"] is not None and entry["expires"] <= now:
        return "expired"
    ending = [item["valid_until"] for item in entry["secrets"]
              if item["valid_until"] is not None and item["valid_until"] > now]
    if ending:
        return f"rotating: old secret valid until {_when(max(ending))}"
    return "active"


@click.group("keys")
def keys_group() -> None:
    """API keys of this node's service: add, list, rotate, revoke (no restart needed)."""


@keys_group.command("add")
@click.argument("name")
@click.option("--expires", default=None, help="Expiry: a duration (90d, 12h) or a date (2027-01-31, UTC).")
@click.option("--metrics", is_flag=True, help="A metrics key: may read /metrics and nothing else (for Prometheus).")
@click.option("--e2b", "e2b_format", is_flag=True,
              help="In E2B's shape (e2b_ and 40 hex digits), for E2B's SDKs against the E2B-compatible API.")
@spec_option
def add_command(name: str, expires: str | None, metrics: bool, e2b_format: bool, spec_path: Path | None) -> None:
    """Add a key named NAME and print it (the only time it is shown)."""
    from service.keys import METRICS, TENANT

    _, store, _ = _store(spec_path)
    try:
        entry, key = store.add(name, METRICS if metrics else TENANT,
                               None if expires is None else parse_expiry(expires, time.time()),
                               key_format="e2b" if e2b_format else "appliance")
    except _errors() as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"added {entry['kind']} key {entry['id']} ({name})" +
               (f", expires {_when(entry['expires'])}" if entry["expires"] else ""), err=True)
    click.echo(key)
    click.echo("This is the only time the key is shown: store it now.", err=True)


@keys_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (no secrets or hashes in it either way).")
@spec_option
def list_command(as_json: bool, spec_path: Path | None) -> None:
    """Keys in the store, and the ids of keys configured in the environment or the spec."""
    from service import settings
    from service.keys import derived_id

    spec, store, secret = _store(spec_path)
    now = time.time()
    try:
        entries = store.list()
    except _errors() as exc:
        raise click.ClickException(str(exc)) from None
    rows = [{"id": entry["id"], "name": entry["name"], "kind": entry["kind"], "source": "store",
             "created": entry["created"], "expires": entry["expires"], "status": status(entry, now)}
            for entry in entries]
    for key in settings.configured_keys(spec):  # environment, spec or key file: the ids the service gives them
        rows.append({"id": derived_id(secret, key), "name": "(configured)", "kind": "tenant", "source": "config",
                     "created": None, "expires": None, "status": "active"})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no keys (add one: appliance keys add NAME)", err=True)
        return
    header = ("ID", "NAME", "KIND", "SOURCE", "CREATED", "EXPIRES", "STATUS")
    table = [header] + [(row["id"], row["name"], row["kind"], row["source"], _when(row["created"]),
                         _when(row["expires"]), row["status"]) for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header) - 1)]
    for line in table:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=False)) + "  " + line[-1])


@keys_group.command("rotate")
@click.argument("key_id")
@click.option("--overlap", default="1h", show_default=True,
              help="How long the current secret stays valid beside the new one (e.g. 0s, 30m, 1d).")
@spec_option
def rotate_command(key_id: str, overlap: str, spec_path: Path | None) -> None:
    """Issue a new secret for KEY_ID and print it; the key keeps its id and its sandboxes."""
    seconds = parse_duration(overlap)
    _, store, _ = _store(spec_path)
    try:
        entry, key = store.rotate(key_id, seconds)
    except _errors() as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"rotated {entry['id']} ({entry['name']}); the previous secret stays valid until "
               f"{_when(time.time() + seconds)}", err=True)
    click.echo(key)
    click.echo("This is the only time the key is shown: store it now.", err=True)


@keys_group.command("revoke")
@click.argument("key_id")
@spec_option
def revoke_command(key_id: str, spec_path: Path | None) -> None:
    """Revoke KEY_ID now (its sandboxes stay until they are closed or time out)."""
    _, store, _ = _store(spec_path)
    try:
        entry = store.revoke(key_id)
    except _errors() as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"revoked {entry['id']} ({entry['name']})")
