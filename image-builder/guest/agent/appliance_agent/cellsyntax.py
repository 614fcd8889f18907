"""IPython's cell syntax turned into Python, as IPython's own input transformers do (inputtransformer2.py).

A cell pasted from a notebook may hold `%magic args`, `%%cellmagic`, `!cmd`, `x = !cmd`, `x = %magic` and
`obj?`. Each becomes a call on the object that get_ipython() returns (magics.py), with the same call names as
IPython's (`get_ipython().run_line_magic('time', '1+1')`), so that `In` holds what a kernel's `In` holds.

Only a line that starts a logical line is rewritten: a `%` or `!` inside brackets, a string or after a
backslash continuation belongs to Python. The scan tracks brackets, quotes and comments by hand rather than with
`tokenize`, whose behaviour on `!` differs between Python versions (3.12's C tokenizer raises).
"""

from __future__ import annotations

import re

_ESCAPE_START = re.compile(r"^[ \t]*[%!?]|=[ \t]*[%!]|\?[ \t]*$", re.MULTILINE)
_ASSIGN = re.compile(r"^([ \t]*)([A-Za-z_][\w.]*(?:[ \t]*,[ \t]*[A-Za-z_][\w.]*)*)[ \t]*=[ \t]*([%!])(.*)$", re.S)
_HELP_END = re.compile(r"^([ \t]*)([A-Za-z_][\w.]*)[ \t]*\?{1,2}[ \t]*$")
_HELP_START = re.compile(r"^([ \t]*)\?{1,2}[ \t]*([A-Za-z_][\w.]*)[ \t]*$")


def needs_transform(code: str) -> bool:
    """Cheap test for the per-exec path: most cells hold none of IPython's syntax."""
    return _ESCAPE_START.search(code) is not None


def transform_cell(code: str) -> str:
    """The cell with IPython syntax rewritten into Python (unchanged when it has none)."""
    if not needs_transform(code):
        return code
    lines = code.splitlines(keepends=True)
    first = 0
    while first < len(lines) and not lines[first].strip():
        first += 1
    if first < len(lines) and lines[first].startswith("%%"):
        return _cell_magic(lines[first], "".join(lines[first + 1 :]))
    out: list[str] = []
    index = 0
    starts = logical_line_starts(lines)
    while index < len(lines):
        line = lines[index]
        if not starts[index]:
            out.append(line)
            index += 1
            continue
        # IPython joins an escaped line's backslash continuations before it rewrites it.
        joined = line
        end = index + 1
        while joined.rstrip("\r\n").endswith("\\") and end < len(lines) and _is_escape(line):
            joined = joined.rstrip("\r\n")[:-1] + " " + lines[end]
            end += 1
        rewritten = _line(joined)
        if rewritten is None:
            out.append(line)
            index += 1
        else:
            out.append(rewritten)
            index = end
    return "".join(out)


def _is_escape(line: str) -> bool:
    stripped = line.lstrip()
    return stripped[:1] in ("%", "!") or _ASSIGN.match(line.rstrip("\r\n")) is not None


def _line(line: str) -> str | None:
    """One logical line rewritten, or None if it is plain Python."""
    newline = line[len(line.rstrip("\r\n")) :]
    body = line[: len(line) - len(newline)]
    stripped = body.lstrip()
    indent = body[: len(body) - len(stripped)]
    if stripped.startswith("!!"):
        return f"{indent}get_ipython().getoutput({stripped[2:]!r}){newline}"
    if stripped.startswith("!"):
        return f"{indent}get_ipython().system({stripped[1:]!r}){newline}"
    if stripped.startswith("%") and not stripped.startswith("%%"):
        return f"{indent}{_line_magic_call(stripped[1:])}{newline}"
    assign = _ASSIGN.match(body)
    if assign is not None:
        space, target, escape, rest = assign.groups()
        if escape == "!":
            call = f"get_ipython().getoutput({rest.strip()!r})"
        elif rest.startswith("%"):
            return None  # `x = %%foo` is not valid in IPython either
        else:
            call = _line_magic_call(rest)
        return f"{space}{target} = {call}{newline}"
    help_request = _HELP_END.match(body) or _HELP_START.match(body)
    if help_request is not None:
        space, name = help_request.groups()
        return f"{space}get_ipython().run_line_magic('pinfo', {name!r}){newline}"
    return None


def _line_magic_call(text: str) -> str:
    name, _, args = text.strip().partition(" ")
    return f"get_ipython().run_line_magic({name!r}, {args.strip()!r})"


def _cell_magic(first: str, body: str) -> str:
    name, _, line = first.strip()[2:].partition(" ")
    return f"get_ipython().run_cell_magic({name!r}, {line.strip()!r}, {body!r})\n"


def logical_line_starts(lines: list[str]) -> list[bool]:
    """For each physical line, whether it starts a logical line: not inside brackets, a string or a backslash
    continuation of the line before."""
    starts = []
    depth = 0
    quote = ""  # the open string's delimiter: ', ", ''' or \"\"\"
    continued = False
    for line in lines:
        starts.append(depth == 0 and not quote and not continued)
        continued = False
        i = 0
        n = len(line)
        while i < n:
            char = line[i]
            if quote:
                if char == "\\":
                    i += 2
                    continue
                if line.startswith(quote, i):
                    i += len(quote)
                    quote = ""
                    continue
                if len(quote) == 1 and char in "\r\n":
                    quote = ""  # an unterminated one-line string: Python will say so
                i += 1
                continue
            if char == "#":
                break
            if char in "'\"":
                triple = char * 3
                quote = triple if line.startswith(triple, i) else char
                i += len(quote)
                continue
            if char in "([{":
                depth += 1
            elif char in ")]}":
                depth = max(0, depth - 1)
            elif char == "\\" and line[i + 1 : i + 2] in ("\n", "\r", ""):
                continued = True
            i += 1
    return starts
