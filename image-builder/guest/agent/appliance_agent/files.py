"""The agent's file operations (see frames.py for the wire format). Plain functions: request in, reply out."""

from __future__ import annotations

import errno
import os
import stat
from typing import Any

from appliance_agent.frames import PAYLOAD_KEY

READ_CHUNK = 1 << 20


class FileOpError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


_ERRNO_CODES = {
    errno.ENOENT: "not_found",
    errno.EISDIR: "is_a_directory",
    errno.ENOTDIR: "not_a_directory",
    errno.EACCES: "permission_denied",
    errno.EPERM: "permission_denied",
}


def _fail(exc: OSError, path: str) -> FileOpError:
    code = _ERRNO_CODES.get(exc.errno or 0, "io_error")
    return FileOpError(code, f"{path}: {exc.strerror or exc}")


def _path(message: dict[str, Any]) -> str:
    path = message.get("path")
    if not isinstance(path, str) or not path or "\0" in path:
        raise FileOpError("io_error", "path must be a non-empty string")
    return path


def file_write(message: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
    """Write (or append) the payload; parent directories are created. Replies with the file's new size."""
    path = _path(message)
    data = message.get(PAYLOAD_KEY, b"")
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_APPEND if message.get("append") else os.O_TRUNC)
    try:
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        fd = os.open(path, flags, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
    except OSError as exc:
        raise _fail(exc, path) from None
    return {"size": size}, b""


def file_read(message: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
    """Up to `max` bytes from `offset`; eof says whether the file ends there."""
    path = _path(message)
    offset = int(message.get("offset", 0))
    limit = min(int(message.get("max", READ_CHUNK)), 8 << 20)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            info = os.fstat(fd)
            if stat.S_ISDIR(info.st_mode):
                raise OSError(errno.EISDIR, "is a directory")
            data = os.pread(fd, limit, offset)
        finally:
            os.close(fd)
    except OSError as exc:
        raise _fail(exc, path) from None
    return {"size": info.st_size, "eof": offset + len(data) >= info.st_size}, data


def list_dir(message: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
    path = _path(message)
    entries = []
    try:
        with os.scandir(path) as scan:
            for entry in scan:
                try:
                    info = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                kind = "dir" if stat.S_ISDIR(info.st_mode) else "file" if stat.S_ISREG(info.st_mode) else (
                    "link" if stat.S_ISLNK(info.st_mode) else "other")
                entries.append({"name": entry.name, "type": kind, "size": info.st_size, "mtime": info.st_mtime})
    except OSError as exc:
        raise _fail(exc, path) from None
    entries.sort(key=lambda e: e["name"])
    return {"entries": entries}, b""


HANDLERS = {"file_write": file_write, "file_read": file_read, "list_dir": list_dir}
