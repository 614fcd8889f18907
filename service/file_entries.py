"""What the guest's file operations answer, made safe for the API: its error codes mapped to service errors, and
its replies held to the shape and size the API documents (a guest is hostile: it may send anything)."""

from __future__ import annotations

from typing import Any

from .errors import InsufficientStorage, Invalid, LimitReached, NotFound, PathConflict, ServiceError

MAX_PATH_CHARS = 4096  # PATH_MAX: no path the guest reports is longer
_KINDS = frozenset({"file", "dir", "link", "other"})


def error_for(code: object, message: str) -> ServiceError:
    """The service error for a guest's error code. The guest's message starts with the path it is about."""
    message = str(message)[:MAX_PATH_CHARS + 200]
    if not isinstance(code, str):  # a hostile guest's list or object (a set lookup of it would raise)
        return ServiceError(message)
    if code == "not_found":
        return NotFound(message)
    if code in {"already_exists", "not_empty"}:
        return PathConflict(str(code), message)
    if code in {"is_a_directory", "not_a_directory", "permission_denied", "invalid_path"}:
        return Invalid(message)
    if code == "limit_reached":
        return LimitReached(message, retry_after=5)
    if code == "no_space":
        return InsufficientStorage(message)
    return ServiceError(message)


def _text(value: object) -> str | None:
    return value[:MAX_PATH_CHARS] if isinstance(value, str) else None


def _number(value: object) -> float | int:
    return value if isinstance(value, int | float) and not isinstance(value, bool) else 0


def stat_reply(reply: dict[str, Any]) -> dict[str, Any]:
    """{name, path, type, size, mtime, mode[, target]} from the guest's reply, nothing else."""
    kind = reply.get("type")
    info: dict[str, Any] = {
        "name": _text(reply.get("name")) or "", "path": _text(reply.get("path")) or "",
        "type": kind if kind in _KINDS else "other", "size": _number(reply.get("size")),
        "mtime": _number(reply.get("mtime")), "mode": _number(reply.get("mode")),
    }
    target = _text(reply.get("target"))
    if info["type"] == "link" and target is not None:
        info["target"] = target
    return info


def watch_event(raw: object) -> dict[str, Any] | None:
    """{type: create|modify|delete, path, is_dir} from one event of the guest's, or None for a malformed one."""
    if not isinstance(raw, dict) or raw.get("type") not in {"create", "modify", "delete"}:
        return None
    path = _text(raw.get("path"))
    if not path:
        return None
    return {"type": raw["type"], "path": path, "is_dir": raw.get("is_dir") is True}
