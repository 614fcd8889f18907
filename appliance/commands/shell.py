from __future__ import annotations

import codeop
import contextlib
import threading
from pathlib import Path

import click

from ..spec import load_spec
from .options import quiet_option, spec_option
from .terminal import boot_sandbox, print_event, print_outcome


def read_cell(prompt=input) -> str | None:
    """One complete Python statement from the user, REPL style; None at end of input."""
    lines: list[str] = []
    while True:
        try:
            line = prompt(">>> " if not lines else "... ")
        except EOFError:
            return None if not lines else "\n".join(lines)
        lines.append(line)
        source = "\n".join(lines)
        try:
            complete = codeop.compile_command(source, "<cell>", "single")
        except (SyntaxError, OverflowError, ValueError):
            return source  # let the sandbox report it, with its traceback
        if complete is not None:
            return source


@click.command("shell")
@spec_option
@quiet_option
def shell_command(spec_path: Path | None, quiet: bool) -> None:
    """An interactive Python prompt whose namespace lives in one microVM. Ctrl-C interrupts, Ctrl-D leaves."""
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401 - line editing and history for input()
    spec = load_spec(spec_path)
    with boot_sandbox(spec, quiet) as sandbox:
        while True:
            try:
                cell = read_cell()
            except KeyboardInterrupt:
                click.echo("\nKeyboardInterrupt")
                continue
            if cell is None:
                click.echo()
                return
            if not cell.strip():
                continue
            outcome: dict = {}
            done = threading.Event()

            def run(cell: str = cell, outcome: dict = outcome, done: threading.Event = done) -> None:
                try:
                    outcome["result"] = sandbox.run_code(cell, on_event=print_event)
                except Exception as exc:  # re-raised below, in the main thread, as a CLI error
                    outcome["error"] = exc
                finally:
                    done.set()

            # The exec runs in a thread so that Ctrl-C reaches the main thread and becomes an interrupt request.
            # We wait on an Event, not Thread.join(): a join interrupted by Ctrl-C can leave is_alive() False while
            # the thread still runs (CPython 3.11), and the shell then read an outcome that was not there yet.
            threading.Thread(target=run, daemon=True).start()
            while not done.is_set():
                try:
                    done.wait()
                except KeyboardInterrupt:
                    sandbox.interrupt()
            if "error" in outcome:
                raise outcome["error"]
            print_outcome(outcome["result"], show_value=True)
