"""The REPL's imitation of IPython (appliance_agent: cellsyntax, history, magics, tbformat, shim/IPython) against
IPython itself, which the host venv has: the same cells through both, the same answers."""

from __future__ import annotations

import base64
import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from appliance_agent import cellsyntax, display, magics, worker

from tests.unit.agent_harness import AgentProcess

PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


@pytest.fixture
def shell() -> Iterator[Any]:
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    config = Config()
    config.HistoryManager.enabled = False
    instance = InteractiveShell.instance(config=config, colors="nocolor")
    instance.InteractiveTB.set_mode("Context")
    try:
        yield instance
    finally:
        InteractiveShell.clear_instance()


TRANSFORMED = [
    "x = 1\n",
    "%time 1+1",
    "!echo hi",
    "!!ls",
    "y = !echo a b\ny",
    "x, y = !echo 1",
    "x = %pwd",
    "%env FOO=bar",
    "%%bash\necho $((1+2))\n",
    "\n\n%%time\nx=1\n",
    "for i in range(2):\n    !echo {i}\n    %time i\n",
    "s = '''\n%not\n!not\n'''\n",
    "f(\n%d\n)",
    "a = 5 % 3\nb = a != 2",
    "%timeit -n1 -r1 \\\n  pass",
    "print(1) # !x\n%cd /tmp",
    "obj?",
    "?obj",
]


@pytest.mark.parametrize("cell", TRANSFORMED)
def test_cell_syntax_becomes_what_ipython_makes_of_it(cell: str) -> None:
    from IPython.core.inputtransformer2 import TransformerManager

    assert cellsyntax.transform_cell(cell).rstrip("\n") == TransformerManager().transform_cell(cell).rstrip("\n")


HISTORY_CELLS = ["3", "_", "4", "__ + ___", "x = 1", "_", "_i", "_ii", "_iii", "_2", "In[1:5]", "Out[3]",
                 "sorted(Out)", "_ = 'mine'", "5", "_", "Out[15]", "x;", "len(In)"]


def test_in_out_and_underscores_follow_ipython(agent: AgentProcess, shell: Any) -> None:
    theirs = []
    for cell in HISTORY_CELLS:
        result = shell.run_cell(cell, store_history=True)
        assert result.error_in_exec is None, (cell, result.error_in_exec)
        theirs.append(None if result.result is None else repr(result.result))
    mine = []
    for cell in HISTORY_CELLS:
        result = agent.run(cell)
        assert result.error is None, (cell, result.error)
        mine.append(result.value)
    assert mine == theirs
    assert mine[1] == "3"  # not vacuous: `_` held the value before it


TRACEBACK_CELLS = [
    "def f(d):\n    return 1 / d\nf(0)",
    "".join(f"x{i} = {i}\n" for i in range(12)) + "1 / 0",
    "def g(a, *rest, k=1, **kw):\n    b = a\n\n    return b[5]\ng([1])",
]


def test_tracebacks_are_shaped_like_ipythons(agent: AgentProcess, shell: Any) -> None:
    for cell in TRACEBACK_CELLS:
        result = shell.run_cell(cell, store_history=True)
        exc = result.error_in_exec
        lines = shell.InteractiveTB.structured_traceback(type(exc), exc, exc.__traceback__, tb_offset=1)
        error = agent.run(cell).error
        assert error["traceback"] == "\n".join(lines), cell
        assert (error["name"], error["value"]) == (type(exc).__name__, str(exc))


def test_syntax_error_is_shaped_like_ipythons(agent: AgentProcess) -> None:
    error = agent.run("a = 1\nb = = 2").error
    assert error["name"] == "SyntaxError"
    assert error["traceback"].startswith("  Cell In[1], line 2\n    b = = 2\n        ^")
    assert error["traceback"].rstrip().endswith("SyntaxError: invalid syntax")


@pytest.mark.parametrize("seconds", [0.0, 3e-9, 4.56e-7, 1.23456e-5, 0.0123, 1.5, 59.9, 75.0, 4000.0])
def test_time_is_formatted_like_ipython(seconds: float) -> None:
    from IPython.core.magics.execution import _format_time

    assert magics.format_time(seconds) == _format_time(seconds)


@pytest.mark.parametrize("text", ["echo $x {x + 1}", "echo $$HOME", "echo {{lit}} $x", "echo ${HOME}",
                                  "echo $missing", "ls {", "echo $d.key"])
def test_variables_expand_like_ipython(text: str, shell: Any) -> None:
    namespace = {"x": 41, "d": type("D", (), {"key": "v"})()}
    shell.user_ns.update(namespace)
    assert magics.var_expand(text, namespace) == shell.var_expand(text)


def _shim_display() -> Any:
    """The guest's stand-in IPython.core.display, loaded from its file (the host has the real IPython)."""
    path = Path(worker.SHIM_DIR) / "IPython" / "core" / "display.py"
    spec = importlib.util.spec_from_file_location("shim_ipython_display", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("name", "args"), [
    ("HTML", ("<b>x</b>",)), ("Markdown", ("# Title",)), ("Latex", ("$x^2$",)), ("JSON", ({"a": [1, 2]},)),
    ("Image", (PNG,)),
])
def test_display_objects_give_ipythons_mime_bundles(name: str, args: tuple[Any, ...], shell: Any) -> None:
    import IPython.display

    real = getattr(IPython.display, name)(*args)
    theirs, _metadata = shell.display_formatter.format(real)
    mine = display.mime_bundle(getattr(_shim_display(), name)(*args))
    assert mine == theirs
    assert len(mine) == 2  # text/plain and the rich one


def test_pip_without_an_operator_index_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(magics, "PIP_INDEX_FILE", str(tmp_path / "absent"))
    with pytest.raises(magics.UsageError, match="no package index"):
        magics.Shell({}).run_line_magic("pip", "install requests")


def test_unknown_magic_names_the_supported_ones() -> None:
    with pytest.raises(magics.UsageError, match=r"`%load_ext` not found \(supported here: %cd"):
        magics.Shell({}).run_line_magic("load_ext", "autoreload")


def test_the_operators_pip_index_is_a_validated_setting_that_reaches_the_guest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pydantic import ValidationError

    from appliance.build import rootfs
    from appliance.spec import GuestSpec

    with pytest.raises(ValidationError, match="pip_index_url"):
        GuestSpec(pip_index_url="http://mirror/simple/ --trusted-host evil")
    assert GuestSpec().content_hash() != GuestSpec(pip_index_url="http://10.0.2.2:3141/simple/").content_hash()
    assert magics.PIP_INDEX_FILE == "/" + rootfs.PIP_INDEX_FILE  # the file the build writes is the one %pip reads
    rootfs.write_pip_index(tmp_path, "http://10.0.2.2:3141/simple/")
    monkeypatch.setattr(magics, "PIP_INDEX_FILE", str(tmp_path / rootfs.PIP_INDEX_FILE))
    assert magics._operator_index() == "http://10.0.2.2:3141/simple/"
