"""The agent's file operations (see frames.py for the wire format). Plain functions: request in, reply out."""

from __future__ import annotations

import bisect
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


# A listing comes in pages: a directory of 230k entries was one 37 MiB reply. A page holds at most MAX_PAGE
# entries (names are at most 255 bytes, so a page stays a few MiB); `after` is the last name of the previous page.
DEFAULT_PAGE, MAX_PAGE = 1000, 10000
# The sorted names of the directory listed last, for its next pages: without it every page of a 200k-entry
# directory would scan and sort all of it again. Valid while the directory's inode and mtime are unchanged.
_last_listing: tuple[tuple[int, int, int], list[str]] | None = None


def _sorted_names(path: str) -> list[str]:
    global _last_listing
    info = os.stat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise OSError(errno.ENOTDIR, "not a directory")
    key = (info.st_dev, info.st_ino, info.st_mtime_ns)
    cached = _last_listing
    if cached is not None and cached[0] == key:
        return cached[1]
    names = sorted(os.listdir(path))
    _last_listing = (key, names)
    return names


def list_dir(message: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
    """One page of a directory, in name order: the first `limit` entries whose names sort after `after`, and
    `more` if entries remain. Only the page's entries are stat'ed, whatever the directory's size."""
    path = _path(message)
    limit, after = message.get("limit", DEFAULT_PAGE), message.get("after")
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_PAGE:
        raise FileOpError("io_error", f"limit must be an integer from 1 to {MAX_PAGE}")
    if after is not None and not isinstance(after, str):
        raise FileOpError("io_error", "after must be a name (the last name of the previous page)")
    try:
        names = _sorted_names(path)
    except OSError as exc:
        raise _fail(exc, path) from None
    start = 0 if after is None else bisect.bisect_right(names, after)
    page = names[start:start + limit]
    more = start + limit < len(names)
    entries = []
    for name in page:
        try:
            info = os.lstat(os.path.join(path, name))
        except OSError:
            continue  # gone since the scan
        kind = "dir" if stat.S_ISDIR(info.st_mode) else "file" if stat.S_ISREG(info.st_mode) else (
            "link" if stat.S_ISLNK(info.st_mode) else "other")
        entries.append({"name": name, "type": kind, "size": info.st_size, "mtime": info.st_mtime})
    return {"entries": entries, "more": more, "after": page[-1] if more else None}, b""


HANDLERS = {"file_write": file_write, "file_read": file_read, "list_dir": list_dir}
