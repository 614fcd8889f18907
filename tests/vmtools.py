"""Test helpers for real VMs: find and end only the QEMU processes a test started (by its run dir), by PID."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path


def qemu_pids_under(run_dir: Path) -> list[int]:
    """PIDs of live QEMU processes whose command line mentions `run_dir` (every VM path lives below it)."""
    needle = str(run_dir).encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if b"qemu-system" in cmdline and needle in cmdline and state != "Z":
            pids.append(int(entry.name))
    return pids


def kill_qemus_under(run_dir: Path) -> list[int]:
    """SIGKILL every QEMU under `run_dir`; returns what it had to kill (a test that leaks shows up here)."""
    pids = qemu_pids_under(run_dir)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while qemu_pids_under(run_dir) and time.monotonic() < deadline:
        time.sleep(0.02)
    return pids
