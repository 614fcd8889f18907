"""Tracebacks shaped like IPython 9's (its "Context" mode, without colours), as a notebook shows them.

    ---------------------------------------------------------------------------
    ZeroDivisionError                         Traceback (most recent call last)
    Cell In[2], line 3
          1 def f():
          2     return 1/0
    ----> 3 f()
    <BLANKLINE>
    ZeroDivisionError: division by zero

Context is two lines either side of the failing line, within the function the frame runs (the module for a
cell), blank lines neither shown nor counted. IPython gets that from stack_data; for library frames it also folds
multi-line statements, which this does not.
"""

from __future__ import annotations

import linecache
import re

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from types import CodeType, TracebackType

_WIDTH = 75
_HEADER = "Traceback (most recent call last)"
_CELL = re.compile(r"^<cell-(\d+)>$")
_CO_VARARGS, _CO_VARKEYWORDS = 0x04, 0x08
_CAUSE = "\nThe above exception was the direct cause of the following exception:\n"
_CONTEXT = "\nDuring handling of the above exception, another exception occurred:\n"


def format_exception(exc: BaseException, tb: TracebackType | None, hidden: Callable[[str], bool]) -> str:
    """The whole chain (causes first), frames of files for which hidden(filename) is true left out."""
    chain: list[tuple[BaseException, TracebackType | None, str]] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    current_tb = tb
    note = ""
    while current is not None and id(current) not in seen and len(chain) < 32:
        seen.add(id(current))
        chain.append((current, current_tb, note))
        if current.__cause__ is not None:
            current, note = current.__cause__, _CAUSE
        elif current.__context__ is not None and not current.__suppress_context__:
            current, note = current.__context__, _CONTEXT
        else:
            break
        current_tb = current.__traceback__
    if len(chain) == 1 and isinstance(exc, SyntaxError) and tb is None:
        return _syntax_error(exc)  # a cell that did not parse: IPython shows no header either
    parts = ["-" * _WIDTH]
    for position, (item, item_tb, _note) in enumerate(reversed(chain)):
        if position:
            parts.append(chain[len(chain) - position][2])  # the note of the exception after this one
        parts.extend(_one(item, item_tb, hidden))
    return "\n".join(parts)


def _one(exc: BaseException, tb: TracebackType | None, hidden: Callable[[str], bool]) -> list[str]:
    if isinstance(exc, SyntaxError) and tb is None:
        return [_syntax_error(exc)]
    name = type(exc).__name__
    entries = [f"{name.ljust(_WIDTH - len(_HEADER))}{_HEADER}"]
    while tb is not None:
        code = tb.tb_frame.f_code
        if not hidden(code.co_filename):
            entries.append(_frame(code, tb.tb_lineno))
        tb = tb.tb_next
    entries.append(exception_line(exc))
    return entries


def _frame(code: CodeType, lineno: int) -> str:
    filename = code.co_filename
    cell = _CELL.match(filename)
    where = f"Cell In[{cell.group(1)}], line {lineno}" if cell else f"File {filename}:{lineno}"
    if code.co_name != "<module>":
        where += f", in {getattr(code, 'co_qualname', code.co_name)}({', '.join(_arguments(code))})"
    lines = [where]
    first, last = _scope(code)
    numbers = [*_neighbours(filename, lineno, range(lineno - 1, first - 1, -1))[::-1], lineno]
    numbers += _neighbours(filename, lineno, range(lineno + 1, last + 1))
    for number in numbers:
        text = linecache.getline(filename, number).rstrip()
        if number == lineno:
            pad = 7 - len(str(number))
            prefix = ("-" * (pad - 2) + "> ") if pad >= 2 else (" " if pad == 1 else "")
            lines.append(f"{prefix}{number} {text}")
        else:
            lines.append(f"{number:>7} {text}")
    return "\n".join(lines) + "\n"


def _neighbours(filename: str, lineno: int, candidates: range) -> list[int]:
    """The first two non-blank lines of candidates (IPython's context counts no blank line)."""
    found: list[int] = []
    for number in candidates:
        text = linecache.getline(filename, number)
        if not text:
            break  # past the end of the source
        if text.strip():
            found.append(number)
            if len(found) == 2:
                break
    return found


def _scope(code: CodeType) -> tuple[int, int]:
    """First and last line of the frame's function (a module's: the whole file)."""
    if code.co_name == "<module>":
        return 1, 1 << 30
    numbers = [line for _start, _end, line in code.co_lines() if line is not None]
    return code.co_firstlineno, max(numbers, default=code.co_firstlineno)


def _arguments(code: CodeType) -> list[str]:
    """Parameter names in inspect.getargvalues' order: positional and keyword-only, then *args, **kwargs."""
    count = code.co_argcount + code.co_kwonlyargcount
    names = list(code.co_varnames[:count])
    if code.co_flags & _CO_VARARGS:
        names.append("*" + code.co_varnames[count])
        count += 1
    if code.co_flags & _CO_VARKEYWORDS:
        names.append("**" + code.co_varnames[count])
    return names


def exception_line(exc: BaseException) -> str:
    try:
        value = str(exc)
    except Exception:
        value = "<str() failed>"
    name = type(exc).__name__
    return f"{name}: {value}" if value else name


def _syntax_error(exc: SyntaxError) -> str:
    """`  Cell In[3], line 1` / the line / a caret / `SyntaxError: message`, as IPython shows a parse error."""
    filename = exc.filename or "<unknown>"
    cell = _CELL.match(filename)
    where = f"Cell In[{cell.group(1)}], line {exc.lineno}" if cell else f"File {filename}:{exc.lineno}"
    lines = [f"  {where}"]
    text = exc.text
    if text is None and exc.lineno:
        text = linecache.getline(filename, exc.lineno)
    if text:
        stripped = text.rstrip("\r\n")
        indent = len(stripped) - len(stripped.lstrip())
        lines.append("    " + stripped.strip())
        if exc.offset:
            lines.append("    " + " " * max(0, exc.offset - 1 - indent) + "^")
    lines.append(f"{type(exc).__name__}: {exc.msg}")
    return "\n".join(lines) + "\n"
