"""A hostile guest cannot make the host hold unbounded data through the serial console: guest code (root in the
guest: the deployment's opt-in) floods /dev/ttyS0, the host keeps no file that grows with it, a failure report
reads only a bounded tail of it, and the sandbox carries on. (The directory-listing flood is in test_manager.py,
where a manager is.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from service.engine.machine import CONSOLE_RING_BYTES
from service.engine.vm import REPORT_TAIL_CHARS

pytestmark = pytest.mark.integration
FLOOD_BYTES = 1 << 20  # 16 times the console ring; a few seconds of the emulated UART

FLOOD = f"""
line = b"console flood " + b"x" * 100 + b"\\n"
with open("/dev/ttyS0", "wb", buffering=0) as console:
    written = 0
    while written < {FLOOD_BYTES}:
        written += console.write(line * 64)
    console.write(b"the last words of the flood\\n")
written
"""


def file_bytes(directory: Path) -> int:
    """Bytes in the regular files of the VM's directory on the host (its sockets hold nothing)."""
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


@pytest.fixture(scope="module")
def sandbox(root_engine):
    with root_engine.boot() as booted:
        yield booted


def test_a_console_flood_grows_no_host_file_and_the_sandbox_stays_usable(sandbox):
    before = file_bytes(sandbox.vm.dir)
    result = sandbox.run_code(FLOOD, timeout_s=300)
    assert result.error is None, result.error
    assert int(result.text) >= FLOOD_BYTES  # the guest really wrote it all
    grown = file_bytes(sandbox.vm.dir) - before
    assert grown < CONSOLE_RING_BYTES, f"the VM's files on the host grew by {grown} bytes"
    report = sandbox.vm.failure_report()  # what a lost sandbox would say: the console's last lines, bounded
    assert "console: " in report and report.endswith("the last words of the flood"), report[-300:]
    assert len(report) <= 2 * REPORT_TAIL_CHARS + 100  # QEMU's log and the console, each a bounded tail
    sandbox.run_code("open('/dev/ttyS0', 'w').write('x' * 100000)")
    assert len(sandbox.vm.console_tail().encode()) == CONSOLE_RING_BYTES  # full, and no more
    assert sandbox.run_code("1 + 1").text == "2"
