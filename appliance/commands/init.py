from __future__ import annotations

from pathlib import Path

import click

from ..spec_file import render_spec_toml


@click.command("init")
@click.option("--output", "-o", type=click.Path(path_type=Path, dir_okay=False), default=Path("appliance.toml"),
              show_default=True, help="Where to write the spec.")
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
def init_command(output: Path, force: bool) -> None:
    """Write a commented appliance.toml with every setting at its default."""
    if output.exists() and not force:
        raise click.ClickException(f"{output} exists; pass --force to overwrite it")
    output.write_text(render_spec_toml())
    click.echo(f"wrote {output}")
