"""A notebook-style session in a real guest gives what a local IPython kernel gives for the same cells.

The kernel is ipykernel from the host venv, started with jupyter_client; the guest has no IPython and imitates
it (appliance_agent: cellsyntax, history, magics, tbformat, shim/IPython). Compared per cell: stdout, the
value's MIME bundle, the displays' MIME bundles (data, not metadata), and errors (name, value and the
traceback's text without colours). Timings in %time/%timeit output are masked: their shape is compared.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from typing import Any

import pytest

pytestmark = pytest.mark.integration

HANG_DEADLINE_S = 60  # waits that only a hang reaches
# A 1x1 PNG, so that Image(data=...) has real bytes to encode.
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)
CELLS = [
    "x = 6 * 7\nx",
    "_",
    "y = x + 1\ny",
    "__",
    "Out[1], In[1], _i",
    "!echo hello $x",
    "files = !printf 'a\\nb\\n'\nfiles",
    "%env DEMO_FLAG=on",
    "import os\nos.environ['DEMO_FLAG'], _exit_code",
    "%cd /tmp",
    "%%bash\necho from bash $((2+3))",
    "from IPython.display import HTML, Markdown, JSON, Image, display\n"
    "display(HTML('<b>bold</b>'), Markdown('# Title'), JSON({'a': [1, 2]}))",
    f"Image(data={PNG!r})",
    "%time 1 + 1",
    "%timeit -n1 -r1 pass",
    "def f(d):\n    return 1 / d\nf(0)",
    "sorted(k for k in Out)",
]
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# IPython prints %.3g: "1e+03 µs" on a slow host as well as "5.2 ms"
_TIME = re.compile(r"\d+(\.\d+)?(e[+-]\d+)? (ns|μs|ms|s)")


@dataclass
class Cell:
    stdout: str = ""
    value: dict[str, Any] | None = None
    displays: list[dict[str, Any]] = field(default_factory=list)
    error: tuple[str, str, str] | None = None


def normalise(text: str) -> str:
    return _TIME.sub("T", text.replace("\r\n", "\n"))


def kernel_session(cells: list[str]) -> list[Cell]:
    from jupyter_client.manager import start_new_kernel

    manager, client = start_new_kernel(kernel_name="python3", startup_timeout=HANG_DEADLINE_S)
    try:
        results = []
        for code in cells:
            message_id = client.execute(code)
            cell = Cell()
            while True:
                message = client.get_iopub_msg(timeout=HANG_DEADLINE_S)
                if message["parent_header"].get("msg_id") != message_id:
                    continue
                kind, content = message["msg_type"], message["content"]
                if kind == "status" and content["execution_state"] == "idle":
                    break
                if kind == "stream" and content["name"] == "stdout":
                    cell.stdout += content["text"]
                elif kind == "execute_result":
                    cell.value = content["data"]
                elif kind == "display_data":
                    cell.displays.append(content["data"])
                elif kind == "error":
                    traceback = "\n".join(_ANSI.sub("", line) for line in content["traceback"])
                    cell.error = (content["ename"], content["evalue"], traceback)
            results.append(cell)
        return results
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)


def guest_session(sandbox, cells: list[str]) -> list[Cell]:
    results = []
    for code in cells:
        result = sandbox.run_code(code, timeout_s=HANG_DEADLINE_S)
        error = None
        if result.error is not None:
            error = (result.error["name"], result.error["value"], result.error["traceback"])
        results.append(Cell(result.stdout, result.value, result.displays, error))
    return results


def test_notebook_session_matches_a_local_ipython_kernel(sandbox):
    sandbox.call("restart_worker")  # a fresh namespace: execution counts start at 1, as in the new kernel
    guest = guest_session(sandbox, CELLS)
    local = kernel_session(CELLS)
    for code, mine, theirs in zip(CELLS, guest, local, strict=True):
        assert normalise(mine.stdout) == normalise(theirs.stdout), code
        assert mine.value == theirs.value, code
        assert mine.displays == theirs.displays, code
        assert mine.error == theirs.error, code
    # The session really exercised what it names (a vacuous match of two empty sessions proves nothing).
    assert guest[1].value == {"text/plain": "42"}
    assert guest[5].stdout.strip() == "hello 42"
    assert [d.get("text/html") for d in guest[11].displays][:1] == ["<b>bold</b>"]
    assert guest[12].value["image/png"] == base64.b64encode(PNG).decode()
    assert guest[15].error is not None and "Cell In[16], line 3" in guest[15].error[2]


def test_unsupported_magic_is_a_clear_error(sandbox):
    result = sandbox.run_code("%load_ext autoreload", timeout_s=HANG_DEADLINE_S)
    assert result.error["name"] == "UsageError"
    assert "%load_ext" in result.error["value"] and "supported here" in result.error["value"]
    pip = sandbox.run_code("%pip install requests", timeout_s=HANG_DEADLINE_S)
    assert pip.error["name"] == "UsageError"
    assert "no package index" in pip.error["value"]
