"""`appliance templates publish|list|rm`: templates every key of this node may create sandboxes from
(POST /v1/sandboxes {"template": NAME}), published from a key's named snapshot.

An operator's command on the node itself (run as the service's user or as root), like `appliance keys`: it reads
and writes the node's registry (`<state_dir>/registry.sqlite3`); the running service sees a change at once. A
template shares its snapshot's memory file (nothing is copied); the file stays until no snapshot, template or
sandbox uses it. It lives in the node's run directory (tmpfs): a host reboot loses it, as it does the snapshot.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import click

from ..spec import load_spec
from .options import spec_option


def _node(spec_path: Path | None):
    """The registry and template store of the spec's node."""
    from service import settings
    from service.registry import Registry
    from service.template_store import TemplateStore

    config = settings.service_config(load_spec(spec_path), [])
    if not config.registry_path.exists():
        raise click.ClickException(f"no registry at {config.registry_path}: has the service run on this node?")
    return Registry(config.registry_path), TemplateStore(config.templates_dir)


def _checked(name: str) -> str:
    from service.snapshot_names import DEFAULT_TEMPLATE, name_problem

    problem = name_problem(name)
    if problem is not None:
        raise click.ClickException(f"{name!r}: {problem}")
    if name == DEFAULT_TEMPLATE:
        raise click.ClickException(f"{DEFAULT_TEMPLATE!r} is the service's own warm template")
    return name


@click.group("templates")
def templates_group() -> None:
    """Publish a key's named snapshot as a template every key can create sandboxes from."""


@templates_group.command("publish")
@click.argument("snapshot")
@click.option("--key-id", required=True, help="Id of the key that owns the snapshot (`appliance keys list`).")
@click.option("--as", "name", default=None, help="The template's name (default: the snapshot's).")
@spec_option
def publish_command(snapshot: str, key_id: str, name: str | None, spec_path: Path | None) -> None:
    """Publish SNAPSHOT (of the key --key-id) as a template for every key."""
    from service.registry import READY, NameTaken

    name = _checked(name or snapshot)
    registry, _ = _node(spec_path)
    try:
        found = registry.snapshot(key_id, _checked(snapshot))
        if found is None or found.state != READY:
            raise click.ClickException(f"key {key_id} has no ready snapshot named {snapshot!r}")
        try:
            registry.publish_snapshot(found, name)
        except NameTaken:
            raise click.ClickException(f"a template named {name!r} exists; `appliance templates rm {name}` "
                                       "first") from None
    finally:
        registry.close()
    click.echo(f"published {name} (from {key_id}'s snapshot {snapshot}): POST /v1/sandboxes "
               f'{{"template": "{name}"}}')


@templates_group.command("list")
@spec_option
def list_command(spec_path: Path | None) -> None:
    """List the published templates."""
    from service.registry import PUBLIC

    registry, _ = _node(spec_path)
    try:
        published = registry.snapshots(PUBLIC)
    finally:
        registry.close()
    if not published:
        click.echo("no published templates", err=True)
        return
    rows = [("NAME", "MEMORY", "SIZE", "FROM SANDBOX", "PUBLISHED")]
    for template in published:
        rows.append((template.name, f"{template.machine.get('memory_mib')} MiB",
                     f"{template.size_bytes >> 20} MiB", template.source or "-",
                     datetime.fromtimestamp(template.created_at, tz=UTC).strftime("%Y-%m-%d %H:%M UTC")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


@templates_group.command("rm")
@click.argument("name")
@spec_option
def rm_command(name: str, spec_path: Path | None) -> None:
    """Unpublish template NAME; sandboxes made from it keep running."""
    from service.registry import PUBLIC

    registry, store = _node(spec_path)
    try:
        found = registry.snapshot(PUBLIC, _checked(name))
        if found is None:
            raise click.ClickException(f"no published template named {name!r}")
        registry.remove_snapshot(PUBLIC, name)
        store.release(found.template_id, registry)
    finally:
        registry.close()
    click.echo(f"removed {name}")
