"""Options shared by several commands, defined once (no logic here)."""

from __future__ import annotations

from pathlib import Path

import click

spec_option = click.option(
    "--spec",
    "spec_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Spec file (default: ./appliance.toml, or $APPLIANCE_CONFIG).",
)
quiet_option = click.option("--quiet", "-q", is_flag=True, help="Print no progress.")
