"""One module per command group; each exposes a Click command or group that cli.py registers."""
