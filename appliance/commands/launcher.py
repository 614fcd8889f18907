"""`appliance launcher`: the root VMM launcher, for an API that runs as an unprivileged user."""

from __future__ import annotations

import logging
import os
import pwd
import signal
import threading
from pathlib import Path

import click

from ..spec import load_spec
from .options import spec_option


@click.command("launcher")
@click.option("--group", "client_group", default=None,
              help="Group that may use the socket (the API's user group; default: root only).")
@click.option("--allow-user", "allowed_users", multiple=True, metavar="USER",
              help="A user (name or uid) whose requests are served, besides root: the API's user. Required; "
              "repeatable.")
@spec_option
def launcher_command(client_group: str | None, allowed_users: tuple[str, ...], spec_path: Path | None) -> None:
    """Run the VMM launcher (as root): it starts each sandbox's QEMU jailed, stops it, and attaches networks, on
    request of the API over the socket in the spec's isolation.launcher_socket. VM dirs go in its own
    isolation.launcher_dir (root's); images are booted only from the spec's image directory, which must be root's
    alone; only root and the --allow-user users are served (checked by the peer's credentials). SIGTERM or
    Ctrl-C stops it; running VMs stay up."""
    from appliance.spec import guest_image_dir
    from service import settings
    from service.engine.launch_checks import LauncherScope
    from service.launcherd import LauncherConfig, serve

    if os.geteuid() != 0:
        raise click.ClickException("the launcher switches users and creates namespaces: run it as root")
    if not allowed_users:
        raise click.ClickException("--allow-user is required: name the API's user (the launcher serves only it)")
    allowed_uids = frozenset(_uid_of(user) for user in allowed_users)
    spec = load_spec(spec_path)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if spec.isolation.jail == "off":
        raise click.ClickException("isolation.jail is 'off' in the spec: there is nothing for a launcher to do")
    image_dir = guest_image_dir(spec)
    roots = (image_dir.parent,)  # the image and the ones beside it (an upgrade keeps the previous one)
    config = LauncherConfig(socket_path=spec.isolation.launcher_socket,
                            scope=LauncherScope(vms_dir=spec.isolation.launcher_dir, run_root=spec.paths.run_dir,
                                                image_roots=roots),
                            policy=settings.jail_policy(spec), client_group=client_group,
                            allowed_uids=allowed_uids, network=settings.network_settings(spec))
    spec.paths.run_dir.mkdir(parents=True, exist_ok=True)
    try:
        server = serve(config)
    except (OSError, KeyError, ValueError) as exc:
        raise click.ClickException(f"cannot start the launcher: {exc}") from None
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    click.echo(f"VMM launcher on {config.socket_path}", err=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        config.socket_path.unlink(missing_ok=True)


def _uid_of(user: str) -> int:
    if user.isdigit():
        return int(user)
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        raise click.ClickException(f"--allow-user {user}: no such user") from None
