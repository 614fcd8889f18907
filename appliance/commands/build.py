from __future__ import annotations

from pathlib import Path

import click

from ..progress import Progress
from .common import load, quiet_option, spec_option


@click.group("build")
def build_group() -> None:
    """Build images: the guest image sandboxes boot from (and, later, a host disk image)."""


@build_group.command("guest")
@spec_option
@quiet_option
@click.option("--force", is_flag=True, help="Rebuild even if an image for this spec exists.")
def build_guest(spec_path: Path | None, quiet: bool, force: bool) -> None:
    """Kernel + initramfs + read-only rootfs + manifest, cached by spec hash."""
    from ..build.guest import build_guest_image

    spec = load(spec_path)
    image_dir = build_guest_image(spec, force=force, progress=Progress(quiet=quiet))
    click.echo(str(image_dir))
