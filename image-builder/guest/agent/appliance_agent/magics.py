"""What get_ipython() returns in the worker: the magics agents use, `!` commands, and a clear error for the rest.

Imitated, not imported: IPython itself costs ~35 s to import and ~38 ms per `x=1` cell in a TCG guest (against
0.23 ms for the worker's own path; measured 2026-12-03, see worker.py). The output of each magic follows
IPython 9's text, so that a notebook's cells read the same here.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

# The operator's package index for %pip (written into the image from the spec; user code cannot change it).
PIP_INDEX_FILE = "/etc/appliance/pip-index-url"


class UsageError(Exception):
    """A magic used wrongly, or one this sandbox does not have (IPython's name for it)."""


class SList(list):
    """The list of output lines that `x = !cmd` gives, with IPython's .s/.n/.l views."""

    @property
    def s(self) -> str:
        return " ".join(self)

    @property
    def n(self) -> str:
        return "\n".join(self)

    @property
    def l(self) -> list[str]:  # noqa: E743 - IPython's name
        return list(self)


class Shell:
    """The object get_ipython() returns: the calls that cellsyntax.py writes into transformed cells."""

    def __init__(self, namespace: dict[str, Any]) -> None:
        self.user_ns = namespace
        self._line: dict[str, Callable[[str], Any]] = {
            "time": self._time, "timeit": self._timeit, "pip": self._pip, "cd": self._cd, "env": self._env,
            "pwd": lambda _line: os.getcwd(), "matplotlib": self._matplotlib, "pinfo": self._pinfo,
            "pinfo2": self._pinfo,
        }
        self._cell: dict[str, Callable[[str, str], Any]] = {
            "bash": self._bash, "sh": self._bash, "time": self._time_cell, "timeit": self._timeit_cell,
            "writefile": self._writefile,
        }
        self._previous_dir = os.getcwd()

    # -- the calls in transformed cells -------------------------------------------------------------------------

    def run_line_magic(self, name: str, line: str) -> Any:
        magic = self._line.get(name)
        if magic is None:
            raise UsageError(f"Line magic function `%{name}` not found (supported here: "
                             f"{', '.join('%' + n for n in sorted(self._line) if n != 'pinfo2')}).")
        return magic(self.var_expand(line) if name not in ("time", "timeit") else line)

    def run_cell_magic(self, name: str, line: str, cell: str) -> Any:
        magic = self._cell.get(name)
        if magic is None:
            raise UsageError(f"Cell magic `%%{name}` not found (supported here: "
                             f"{', '.join('%%' + n for n in sorted(self._cell))}).")
        return magic(self.var_expand(line), cell)

    def system(self, command: str) -> None:
        """`!cmd`: run it in a shell, its output going where the cell's goes; `_exit_code` gets its status."""
        _flush()
        completed = subprocess.run(["/bin/bash", "-c", self.var_expand(command)], check=False)
        self.user_ns["_exit_code"] = completed.returncode

    def getoutput(self, command: str) -> SList:
        """`x = !cmd`: its output lines (stderr too, as IPython gives them)."""
        _flush()
        completed = subprocess.run(["/bin/bash", "-c", self.var_expand(command)], check=False,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.user_ns["_exit_code"] = completed.returncode
        return SList(completed.stdout.decode("utf-8", "replace").splitlines())

    def var_expand(self, text: str) -> str:
        """`$name`, `{expression}` from the user's namespace, as IPython expands them; on any failure, the text
        as it was."""
        return var_expand(text, self.user_ns)

    # -- line magics --------------------------------------------------------------------------------------------

    def _time(self, line: str) -> Any:
        return self._timed(line, "<timed exec>")

    def _time_cell(self, line: str, cell: str) -> Any:
        return self._timed(cell, "<timed exec>")

    def _timed(self, source: str, filename: str) -> Any:
        import ast

        tree = ast.parse(source, filename)
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            last = compile(ast.Expression(tree.body.pop().value), filename, "eval")
        body = compile(tree, filename, "exec")
        wall, cpu = time.perf_counter(), os.times()
        value = None
        try:
            exec(body, self.user_ns)
            if last is not None:
                value = eval(last, self.user_ns)
        finally:
            end_cpu, end_wall = os.times(), time.perf_counter()
            user, system = end_cpu.user - cpu.user, end_cpu.system - cpu.system
            print(f"CPU times: user {format_time(user)}, sys: {format_time(system)}, "
                  f"total: {format_time(user + system)}\nWall time: {format_time(end_wall - wall)}")
        return value

    def _timeit(self, line: str) -> Any:
        return self._timeit_run(line, None)

    def _timeit_cell(self, line: str, cell: str) -> Any:
        return self._timeit_run(line, cell)

    def _timeit_run(self, line: str, cell: str | None) -> Any:
        import timeit

        options, statement = _timeit_options(line)
        setup = "pass"
        if cell is not None:
            setup, statement = statement or "pass", cell
        timer = timeit.Timer(statement, setup, timer=time.perf_counter, globals=self.user_ns)
        number = options.get("n", 0)
        if not number:  # IPython's rule: the first power of ten whose loop takes at least 0.2 s
            for power in range(10):
                number = 10**power
                if timer.timeit(number) >= 0.2:
                    break
        repeat = options.get("r", 7)
        timings = [t / number for t in timer.repeat(repeat, number)]
        result = TimeitResult(number, repeat, timings)
        if not options.get("q"):
            print(result)
        return result if options.get("o") else None

    def _cd(self, line: str) -> None:
        target = line.strip().strip("'\"") or os.path.expanduser("~")
        if target == "-":
            target = self._previous_dir
        current = os.getcwd()
        os.chdir(os.path.expanduser(target))
        self._previous_dir = current
        history = self.user_ns.get("_dh")
        if isinstance(history, list):
            history.append(os.getcwd())
        print(os.getcwd())

    def _env(self, line: str) -> Any:
        line = line.strip()
        if not line:
            return dict(os.environ)
        if "=" in line or " " in line:
            name, _, value = line.partition("=") if "=" in line else line.partition(" ")
            name, value = name.strip(), value.strip()
            os.environ[name] = value
            print(f"env: {name}={value}")
            return None
        if line not in os.environ:
            raise UsageError(f"Environment does not have key: {line}")
        return os.environ[line]

    def _pip(self, line: str) -> None:
        index = _operator_index()
        if index is None:
            raise UsageError("%pip is not available: the operator has configured no package index for guests "
                             "(spec: guest.pip_index_url).")
        import importlib.util
        import shlex

        if importlib.util.find_spec("pip") is None:
            raise UsageError("%pip: pip is not installed in this image (the operator adds python3-pip to the "
                             "spec's guest.apt_packages).")
        args = shlex.split(line)
        if args[:1] != ["install"]:
            raise UsageError("%pip supports `install` only here (the index is the operator's).")
        _flush()
        completed = subprocess.run([sys.executable, "-m", "pip", "install", "--user", "--no-input",
                                    "--disable-pip-version-check", "--isolated", "--index-url", index,
                                    *(a for a in args[1:] if not a.startswith(("--index", "--extra-index",
                                                                              "-i", "--find-links", "-f")))],
                                   check=False)
        if completed.returncode == 0:
            print("Note: you may need to restart the kernel to use updated packages.")

    def _matplotlib(self, line: str) -> None:
        if line.strip() not in ("", "inline"):
            raise UsageError(f"%matplotlib {line.strip()}: only the inline backend exists here (figures come "
                             "back as image/png displays).")

    def _pinfo(self, line: str) -> None:
        raise UsageError(f"object introspection (`{line}?`) is not supported here; use help({line}).")

    # -- cell magics --------------------------------------------------------------------------------------------

    def _bash(self, line: str, cell: str) -> None:
        _flush()
        completed = subprocess.run(["/bin/bash", *line.split()], input=cell.encode(), check=False)
        self.user_ns["_exit_code"] = completed.returncode

    def _writefile(self, line: str, cell: str) -> None:
        import shlex

        args = shlex.split(line)
        append = args[:1] in (["-a"], ["--append"])
        path = os.path.expanduser(args[-1]) if args else ""
        if not path:
            raise UsageError("%%writefile needs a file name.")
        exists = os.path.exists(path)
        print(f"{'Appending to' if append else 'Overwriting' if exists else 'Writing'} {args[-1]}")
        with open(path, "a" if append else "w", encoding="utf-8") as handle:
            handle.write(cell)


class TimeitResult:
    """What `%timeit -o` returns, with IPython's attributes and text."""

    def __init__(self, loops: int, repeat: int, timings: list[float]) -> None:
        self.loops = loops
        self.repeat = repeat
        self.timings = timings
        self.all_runs = [t * loops for t in timings]
        self.best = min(timings)
        self.worst = max(timings)
        self.average = math.fsum(timings) / len(timings)
        self.stdev = math.sqrt(math.fsum((t - self.average) ** 2 for t in timings) / len(timings))

    def __str__(self) -> str:
        runs = "run" if self.repeat == 1 else "runs"
        loops = "loop" if self.loops == 1 else "loops"
        return (f"{format_time(self.average)} ± {format_time(self.stdev)} per loop (mean ± std. dev. of "
                f"{self.repeat} {runs}, {self.loops:,} {loops} each)")

    def __repr__(self) -> str:
        return f"<TimeitResult : {self}>"


def _timeit_options(line: str) -> tuple[dict[str, int], str]:
    """-n N, -r R, -q, -o in front of the statement (IPython's getopt-style parsing, the options agents use)."""
    options: dict[str, int] = {}
    words = line.split(" ")
    while words and words[0].startswith("-") and len(words[0]) > 1:
        word = words.pop(0)
        flag, value = word[1], word[2:]
        if flag in "nr":
            if not value:
                value = words.pop(0) if words else ""
            if not value.isdigit() or int(value) < 1:
                raise UsageError(f"%timeit -{flag} needs a positive number, not {value!r}.")
            options[flag] = int(value)
        elif flag in "qo" and not value:
            options[flag] = 1
        else:
            raise UsageError(f"%timeit: option {word} is not supported here (-n, -r, -q, -o are).")
    return options, " ".join(words).strip()


def format_time(seconds: float) -> str:
    """IPython's _format_time: three significant digits and a unit."""
    if seconds >= 60.0:
        parts = []
        for name, size in (("d", 86400.0), ("h", 3600.0), ("min", 60.0), ("s", 1.0)):
            value = int(seconds / size)
            if value > 0:
                parts.append(f"{value}{name}")
                seconds %= size
        return " ".join(parts)
    units = ["s", "ms", "\u03bcs", "ns"]
    order = min(-int(math.floor(math.log10(seconds)) // 3), 3) if seconds > 0.0 else 3
    return f"{seconds * 1000**order:.3g} {units[order]}"


def var_expand(text: str, namespace: dict[str, Any]) -> str:
    if "$" not in text and "{" not in text:
        return text
    import re

    def field(match: re.Match[str]) -> str:
        token = match.group(0)
        if token == "$$":
            return "$"
        if token in ("{{", "}}"):
            return token[0]
        expression = match.group(1) or match.group(2)
        return str(eval(expression, namespace))

    try:
        return re.sub(r"\$\$|\{\{|\}\}|\$([A-Za-z_][\w.]*)|\{([^{}]+)\}", field, text)
    except Exception:
        return text


def _operator_index() -> str | None:
    try:
        with open(PIP_INDEX_FILE, encoding="utf-8") as handle:
            url = handle.read().strip()
    except OSError:
        return None
    return url or None


def _flush() -> None:
    """What the cell printed so far goes before the subprocess's output (both reach the same pipes)."""
    for stream in (sys.stdout, sys.stderr):
        try:  # noqa: SIM105
            stream.flush()
        except Exception:
            pass
