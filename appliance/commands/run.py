from __future__ import annotations

from pathlib import Path

import click

from ..spec import load_spec
from .options import quiet_option, spec_option
from .terminal import boot_sandbox, print_event, print_outcome


@click.command("run")
@click.argument("script", type=click.File("r"), required=False)
@click.option("-c", "code", help="Code to run instead of a script file.")
@click.option("--timeout", type=float, default=None, help="Time limit in seconds (default: the spec's).")
@click.option("--bash", "language", flag_value="bash", default="python", help="Run the code with bash.")
@spec_option
@quiet_option
def run_command(script, code: str | None, timeout: float | None, language: str, spec_path: Path | None,
                quiet: bool) -> None:
    """Run Python (a file or -c CODE) in a fresh microVM; exit non-zero if it raised."""
    if (script is None) == (code is None):
        raise click.UsageError("give either a script file or -c CODE")
    source = code if code is not None else script.read()
    spec = load_spec(spec_path)
    with boot_sandbox(spec, quiet) as sandbox:
        try:
            result = sandbox.run_code(source, timeout_s=timeout, language=language, on_event=print_event)
        except KeyboardInterrupt:
            raise click.ClickException("interrupted") from None
    raise SystemExit(print_outcome(result, show_value=code is not None))
