from __future__ import annotations

from pathlib import Path

import click

from ..progress import Progress
from ..spec import load_spec
from .options import quiet_option, spec_option


@click.group("build")
def build_group() -> None:
    """Build images: the guest image sandboxes boot from, and a bootable host disk image."""


@build_group.command("guest")
@spec_option
@quiet_option
@click.option("--force", is_flag=True, help="Rebuild even if an image for this spec exists.")
def build_guest(spec_path: Path | None, quiet: bool, force: bool) -> None:
    """Kernel + initramfs + read-only rootfs + manifest, cached by spec hash."""
    from ..build.guest import build_guest_image

    spec = load_spec(spec_path)
    image_dir = build_guest_image(spec, force=force, progress=Progress(quiet=quiet))
    click.echo(str(image_dir))


@build_group.command("host")
@spec_option
@quiet_option
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False), default=Path("node.img"),
              show_default=True, help="Disk image to write.")
@click.option("--format", "fmt", type=click.Choice(["raw", "qcow2"]), default="raw", show_default=True,
              help="raw (dd it to a disk) or qcow2 (a VM template).")
@click.option("--site-config", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="site.toml to put on the image's config partition (checked now; see the README).")
@click.option("--force", is_flag=True, help="Rebuild the root stage even if it is cached.")
@click.option("--verbose", "-v", is_flag=True, help="Show ansible-playbook's output.")
def build_host(spec_path: Path | None, quiet: bool, output: Path, fmt: str, site_config: Path | None, force: bool,
               verbose: bool) -> None:
    """A bootable GPT disk image (UEFI and BIOS) that comes up as a ready appliance node."""
    from ..build.host.image import build_host_image

    spec = load_spec(spec_path)
    image = build_host_image(spec, output, fmt=fmt, site_config=site_config, force=force,
                             progress=Progress(quiet=quiet), verbose=verbose)
    size = image.manifest["disk"]
    click.echo(f"{image.path}: {fmt}, {size['allocated'] / 2**20:.0f} MiB on disk, a "
               f"{size['virtual_size'] / 2**30:.1f} GiB disk (the node grows its root to its own disk)")
    click.echo(f"manifest: {image.manifest_path}")
