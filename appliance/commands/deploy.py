from __future__ import annotations

from pathlib import Path

import click

from .options import quiet_option


@click.command("deploy")
@click.option("--inventory", "-i", type=click.Path(path_type=Path, dir_okay=True), required=True,
              help="Ansible inventory of the hosts (group 'appliance').")
@click.option("--bundle", "bundle_path", type=click.Path(path_type=Path, dir_okay=False), required=True,
              help="Bundle made by 'appliance bundle'; verified before anything runs.")
@click.option("--playbook", type=click.Choice(["site", "precheck", "deploy", "upgrade"]), default="site",
              show_default=True, help="site: check then converge; precheck: check only; deploy: converge only; "
                                      "upgrade: one host at a time, stopping at the first unhealthy one.")
@click.option("--check", is_flag=True, help="Dry run: show what would change, with diffs; change nothing.")
@click.option("--limit", default=None, help="Only these hosts (an Ansible host pattern).")
@click.option("--ca-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="The site CA that issues the nodes' TLS certificates (made on first use, then kept; its ca.pem "
                   "is what clients trust). Default: appliance-ca/ beside the inventory.")
@quiet_option
def deploy_command(inventory: Path, bundle_path: Path, playbook: str, check: bool, limit: str | None,
                   ca_dir: Path | None, quiet: bool) -> None:
    """Turn Debian 12 hosts into appliance nodes from one offline bundle (wraps ansible-playbook)."""
    from ..deploy import DeployError, run_deploy

    try:
        summary = run_deploy(inventory=inventory, bundle=bundle_path, playbook=playbook, check=check, limit=limit,
                             quiet=quiet, ca_dir=ca_dir)
    except DeployError as exc:
        raise click.ClickException(str(exc)) from None
    if not quiet:
        for line in summary.host_lines():
            click.echo(line)
        if summary.slowest:
            click.echo("slowest: " + ", ".join(f"{name} {seconds:.0f}s" for name, seconds in summary.slowest[:3]))
