"""A sandbox on this machine for `run` and `shell` (and the engine for `doctor` and `serve`): booting it, and its
output on the terminal as it arrives."""

from __future__ import annotations

import click

from ..spec import ApplianceSpec


def open_engine(spec: ApplianceSpec):
    """The engine for the guest image this spec builds (the CLI's one door into service.engine)."""
    from service import settings
    from service.engine import Engine

    return Engine(settings.engine_config(spec))


def boot_sandbox(spec: ApplianceSpec, quiet: bool):
    """A fresh microVM tied to this process; says which accelerator it runs on."""
    engine = open_engine(spec)
    choice = engine.accelerator
    sandbox = engine.boot(die_with_parent=True)
    if not quiet:
        click.secho(f"[sandbox on {choice.name}, ready in {sandbox.boot_seconds:.1f}s]", err=True, dim=True)
    return sandbox


def print_event(event: dict) -> None:
    """Stream one agent event to the terminal as it arrives."""
    kind = event.get("ev")
    if kind == "stdout":
        click.echo(event["data"], nl=False)
    elif kind == "stderr":
        click.echo(event["data"], nl=False, err=True)
    elif kind == "display":
        bundle = event["data"]
        click.echo(bundle.get("text/plain", f"<display: {', '.join(sorted(bundle))}>"))


def print_outcome(result, show_value: bool) -> int:
    """Value and error of a finished exec; returns the process exit code it deserves."""
    if show_value and result.text is not None:
        click.echo(result.text)
    if result.worker_exit and (result.error is None or result.worker_exit not in result.error.get("value", "")):
        click.secho(result.worker_exit, err=True, fg="yellow")
    if result.error is not None:
        if result.error.get("name") == "SystemExit":  # sys.exit(n) in a script: exit n, as python would
            value = result.error.get("value", "")
            return int(value) if value.lstrip("-").isdigit() else (0 if value in ("", "None") else 1)
        click.echo(result.error.get("traceback") or f"{result.error['name']}: {result.error['value']}", err=True)
        return result.exit_code if result.exit_code else 1
    return 0
