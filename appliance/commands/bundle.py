from __future__ import annotations

from pathlib import Path

import click

from ..progress import Progress
from ..spec import load_spec
from .options import quiet_option, spec_option


@click.command("bundle")
@spec_option
@quiet_option
@click.option("--output", "-o", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Bundle file to write (a .tar; .tar.gz compresses it).")
@click.option("--verify", "verify_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Check an existing bundle against its manifest instead of building one.")
@click.option("--image-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Guest image directory to bundle (default: the image this spec builds).")
def bundle_command(spec_path: Path | None, quiet: bool, output: Path | None, verify_path: Path | None,
                   image_dir: Path | None) -> None:
    """Everything a host needs, in one file: host packages, wheelhouse, guest image, playbooks and roles.

    Build it where the Debian archive and PyPI are reachable, carry it across the air gap, then run
    `appliance deploy --bundle FILE`. With --verify, check every file of a bundle against its manifest.
    """
    from .. import bundle

    if (output is None) == (verify_path is None):
        raise click.UsageError("give either --output FILE to build a bundle or --verify FILE to check one")
    progress = Progress(quiet=quiet)
    try:
        if verify_path is not None:
            with progress.phase("verify", verify_path.name):
                manifest = bundle.verify_bundle(verify_path)
        else:
            spec = load_spec(spec_path)
            if image_dir is None:
                from ..spec import guest_image_dir

                image_dir = guest_image_dir(spec)
            assert output is not None
            manifest = bundle.create_bundle(output, image_dir=image_dir, cache_dir=spec.paths.cache_dir,
                                            mirror=spec.guest.mirror, suite=spec.guest.suite, progress=progress)
    except bundle.BundleError as exc:
        raise click.ClickException(str(exc)) from None
    for line in bundle.summary(manifest):
        progress.note(line)
    click.echo(str(verify_path or output))
