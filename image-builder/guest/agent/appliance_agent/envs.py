"""Environment variables that a client gives a sandbox (at create) or one exec or command: the rules that both
the API and the agent check (the agent again: a frame from the host is checked like any other input).

Values are secrets as far as this product knows: they are never logged, and errors name the variable, never its
value.
"""

from __future__ import annotations

import re

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

MAX_VARS = 128
MAX_BYTES = 64 << 10  # names and values together, UTF-8
NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,255}$")
# Names the agent sets for user code itself (codeuser.py), or that would change how the interpreter or the
# loader starts a program: refused rather than silently overridden.
RESERVED = frozenset({"HOME", "USER", "LOGNAME", "LD_PRELOAD", "LD_LIBRARY_PATH", "LD_AUDIT", "PYTHONHOME",
                      "PYTHONPATH", "PYTHONSTARTUP", "PYTHONINSPECT", "BASH_ENV", "ENV"})


class EnvError(ValueError):
    """What is wrong with an env map (never including a value)."""


def check(value: Any, field: str = "envs") -> dict[str, str]:
    """The map, checked; {} for None. EnvError names what is wrong."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise EnvError(f"{field} must be an object of name: string value")
    if len(value) > MAX_VARS:
        raise EnvError(f"{field} has more than {MAX_VARS} variables")
    total = 0
    for name, text in value.items():
        if not isinstance(name, str) or not NAME.match(name):
            raise EnvError(f"{field}: {str(name)[:64]!r} is not a variable name ([A-Za-z_][A-Za-z0-9_]*)")
        if name in RESERVED:
            raise EnvError(f"{field}: {name} is set by the sandbox itself and cannot be given")
        if not isinstance(text, str):
            raise EnvError(f"{field}: the value of {name} must be a string")
        if "\0" in text:
            raise EnvError(f"{field}: the value of {name} contains a NUL byte")
        try:
            total += len(name.encode()) + len(text.encode("utf-8")) + 2
        except UnicodeEncodeError:
            raise EnvError(f"{field}: the value of {name} is not valid Unicode text") from None
    if total > MAX_BYTES:
        raise EnvError(f"{field} is larger than {MAX_BYTES} bytes")
    return dict(value)
