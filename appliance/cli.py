"""The `appliance` command: a thin group; each command lives in appliance/commands/."""

from __future__ import annotations

import logging

import click

from .commands.build import build_group
from .commands.bundle import bundle_command
from .commands.deploy import deploy_command
from .commands.doctor import doctor_command
from .commands.init import init_command
from .commands.keys import keys_group
from .commands.launcher import launcher_command
from .commands.mcp import mcp_command
from .commands.run import run_command
from .commands.sandboxes import sandboxes_group
from .commands.serve import serve_command
from .commands.shell import shell_command
from .commands.templates import templates_group


def _domain_errors() -> tuple[type[BaseException], ...]:
    """Errors we raise on purpose: shown as one line, never as a traceback."""
    from service.engine import EngineError
    from service.engine.accel import AcceleratorUnavailable

    from .build import BuildError
    from .spec import SpecError

    return (EngineError, AcceleratorUnavailable, BuildError, SpecError, OSError)


class ApplianceGroup(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except _domain_errors() as exc:
            raise click.ClickException(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None


@click.group(cls=ApplianceGroup)
@click.option("--verbose", "-v", is_flag=True, help="Log what the engine does.")
@click.version_option(package_name="appliance")
def main(verbose: bool) -> None:
    """appliance: a self-hosted code interpreter; Python in microVMs that persist, fork and freeze."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s")


main.add_command(init_command)
main.add_command(build_group)
main.add_command(run_command)
main.add_command(shell_command)
main.add_command(doctor_command)
main.add_command(serve_command)
main.add_command(launcher_command)
main.add_command(bundle_command)
main.add_command(deploy_command)
main.add_command(sandboxes_group)
main.add_command(keys_group)
main.add_command(templates_group)
main.add_command(mcp_command)
