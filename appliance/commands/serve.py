"""`appliance serve`: the execution API under gunicorn, with the pool keeper beside it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from ..spec import load_spec
from .options import spec_option
from .terminal import open_engine


def gunicorn_argv(config_file: Path) -> list[str]:
    return [sys.executable, "-m", "gunicorn", "--config", str(config_file), "service.api.wsgi:application()"]


@click.command("serve")
@click.option("--host", default=None, help="Address to listen on (default: the spec's service.host, 127.0.0.1).")
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="TCP port (default: service.port, 8080).")
@click.option("--workers", type=click.IntRange(1, 16), default=None, help="API worker processes (default: 2).")
@spec_option
def serve_command(host: str | None, port: int | None, workers: int | None, spec_path: Path | None) -> None:
    """Serve the execution API (gunicorn + Falcon) and keep a warm pool of sandboxes.

    Keys come from APPLIANCE_API_KEYS, the spec, or the key file in the state directory; with none, a key is
    created there (0600) and printed. Ctrl-C or SIGTERM stops the API and the pool keeper; sandboxes users hold
    keep running for the next start.
    """
    from service import settings

    spec = load_spec(spec_path, {"service": {"host": host, "port": port, "workers": workers}})
    open_engine(spec)  # no guest image: fail here in one line, not later in the pool keeper's log
    try:
        _, created = settings.resolve_api_keys(spec)
    except OSError as exc:
        raise click.ClickException(f"cannot create an API key in {spec.paths.state_dir}: {exc.strerror}") from None
    if created is not None:
        key_file = settings.key_file(spec)
        click.echo(f"No API key was configured; created one and wrote it to {key_file} (mode 0600):")
        click.echo(f"  {created}")
        click.echo("Clients send it as 'Authorization: Bearer <key>' (the SDK reads APPLIANCE_API_KEY).")

    # gunicorn, its workers and the pool keeper read the spec themselves: hand them the file and the flags.
    if spec_path is not None:
        os.environ["APPLIANCE_CONFIG"] = str(spec_path.resolve())
    for name, value in (("HOST", host), ("PORT", port), ("WORKERS", workers)):
        if value is not None:
            os.environ[f"APPLIANCE_SERVICE__{name}"] = str(value)
    import service

    config_file = Path(service.__file__).parent / "gunicorn.conf.py"
    click.echo(f"appliance API on http://{spec.service.host}:{spec.service.port} "
               f"({spec.service.workers} workers); docs at /v1/docs", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    # Become the gunicorn master: signals (Ctrl-C, SIGTERM from systemd) reach it directly, nothing in between.
    argv = gunicorn_argv(config_file)
    os.execv(argv[0], argv)


if __name__ == "__main__":  # `python -m appliance.commands.serve`, for harnesses that do not go through the group
    serve_command()
