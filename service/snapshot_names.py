"""Names of snapshots and published templates: what a client or an operator may call one.

A name is only ever a key in the registry (with its owner's key id), never part of a path: the files of a
snapshot are a template directory whose id the engine chose (tpl-<hex>).
"""

from __future__ import annotations

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
MAX_NAME = 64
DEFAULT_TEMPLATE = "default"  # the service's own warm template: not a published one
_FIRST = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
_REST = _FIRST | frozenset("._-")


def name_problem(name: object) -> str | None:
    """Why `name` is not a valid snapshot or template name (None: it is)."""
    if not isinstance(name, str) or not 1 <= len(name) <= MAX_NAME:
        return f"must be a string of 1-{MAX_NAME} characters"
    if name[0] not in _FIRST or set(name) - _REST:
        return "must start with a letter or digit and hold only letters, digits, '.', '_' and '-'"
    return None
