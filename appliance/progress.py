"""Phase progress for long operations (builds, bundles): one line per phase with its time; silent when quiet."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console


class Progress:
    def __init__(self, quiet: bool = False, console: Console | None = None) -> None:
        self.quiet = quiet
        self.console = console or Console(stderr=True, highlight=False)
        self.timings: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str, detail: str = "") -> Iterator[None]:
        """Show a spinner while the phase runs, then '✓ name  12.3s' (or '✗' if it raised)."""
        started = time.monotonic()
        label = f"{name}{f' ({detail})' if detail else ''}"
        status = None if self.quiet else self.console.status(f"{label} …")
        if status is not None:
            status.start()
        try:
            yield
        except BaseException:
            self._finish(status, "[red]✗[/red]", label, started)
            raise
        self._finish(status, "[green]✓[/green]", label, started)
        self.timings[name] = time.monotonic() - started

    def skip(self, name: str, reason: str) -> None:
        if not self.quiet:
            self.console.print(f"[dim]- {name}: {reason}[/dim]")

    def note(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message)

    def _finish(self, status, mark: str, label: str, started: float) -> None:
        if status is not None:
            status.stop()
        if not self.quiet:
            self.console.print(f"{mark} {label}  {time.monotonic() - started:.1f}s")
