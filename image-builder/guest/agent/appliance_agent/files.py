"""The agent's file operations (see frames.py for the wire format). Plain functions: request in, reply out."""

from __future__ import annotations

import bisect
import contextlib
import errno
import os
import re
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
    errno.EEXIST: "already_exists",
    errno.ENOTEMPTY: "not_empty",
    errno.EINVAL: "invalid_path",  # e.g. a directory moved into itself
    errno.ENAMETOOLONG: "invalid_path",
    errno.ELOOP: "invalid_path",
    errno.EBUSY: "invalid_path",  # a mount point
    errno.EROFS: "permission_denied",
    errno.ENOSPC: "no_space",
    errno.EDQUOT: "no_space",
}


def _fail(exc: OSError, path: str) -> FileOpError:
    code = _ERRNO_CODES.get(exc.errno or 0, "io_error")
    return FileOpError(code, f"{path}: {exc.strerror or exc}")


def _path(message: dict[str, Any]) -> str:
    path = message.get("path")
    if not isinstance(path, str) or not path or "\0" in path:
        raise FileOpError("io_error", "path must be a non-empty string")
    return path


# An upload is written under a temporary name beside its target and renamed over it by file_commit, so nobody
# (user code, a download, a listing of the target) ever sees a half-written file. The host picks the token.
_UPLOAD_TOKEN = re.compile(r"[0-9a-f]{8,32}")
_UPLOAD_MARK = ".upload-"
_TEMP_NAME_BYTES = 200  # of the target's name kept in the temporary one: the whole stays under NAME_MAX


def upload_temp(path: str, token: object) -> str:
    """The temporary name of an upload of `path` (same directory: the final rename never crosses filesystems)."""
    if not isinstance(token, str) or not _UPLOAD_TOKEN.fullmatch(token):
        raise FileOpError("invalid_path", "upload must be 8-32 lowercase hex digits")
    parent, name = os.path.split(path)
    if not name or name in {".", ".."}:
        raise FileOpError("invalid_path", f"{path}: not a file name")
    short = os.fsencode(name)[:_TEMP_NAME_BYTES].decode(errors="ignore")
    return os.path.join(parent, f".{short}{_UPLOAD_MARK}{token}")


def file_write(message: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
    """Write (or append) the payload; parent directories are created. Replies with the file's new size. With an
    `upload` token the bytes go to the upload's temporary name (file_commit puts it in place)."""
    path = _path(message)
    if message.get("upload") is not None:
        path = upload_temp(path, message["upload"])
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


def file_commit(message: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
    """Put a finished upload in place (one rename), or with `abort` drop it."""
    path = _path(message)
    temp = upload_temp(path, message.get("upload"))
    try:
        if message.get("abort"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            return {}, b""
        if os.path.isdir(path) and not os.path.islink(path):
            raise OSError(errno.EISDIR, "is a directory")
        os.rename(temp, path)
        size = os.lstat(path).st_size
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temp)
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


MAX_DEPTH = 32  # of a recursive listing: deeper trees are listed from a deeper path


def list_dir(message: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
    """One page of a directory, in name order: the first `limit` entries whose names sort after `after`, and
    `more` if entries remain. Only the page's entries are stat'ed, whatever the directory's size. With `depth` > 1
    the entries of subdirectories follow their directory (names are paths relative to `path`, e.g. "a/b"), to
    that depth; links are listed, never followed."""
    path = _path(message)
    limit, after, depth = message.get("limit", DEFAULT_PAGE), message.get("after"), message.get("depth", 1)
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_PAGE:
        raise FileOpError("io_error", f"limit must be an integer from 1 to {MAX_PAGE}")
    if not isinstance(depth, int) or isinstance(depth, bool) or not 1 <= depth <= MAX_DEPTH:
        raise FileOpError("io_error", f"depth must be an integer from 1 to {MAX_DEPTH}")
    if after is not None and not isinstance(after, str):
        raise FileOpError("io_error", "after must be a name (the last name of the previous page)")
    if depth > 1:
        return _list_tree(path, limit, after, depth), b""
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
        entries.append(_entry(name, os.path.join(path, name), info))
    return {"entries": entries, "more": more, "after": page[-1] if more else None}, b""


def _list_tree(root: str, limit: int, after: str | None, depth: int) -> dict[str, Any]:
    """A page of a pre-order walk (a directory, then its entries, each level in name order). The cursor is the
    last relative path sent: the walk skips every path that sorts before it, component by component, so a page
    costs the directories on the way to it, not the whole tree before it."""
    try:
        if not stat.S_ISDIR(os.stat(root).st_mode):
            raise OSError(errno.ENOTDIR, "not a directory")
    except OSError as exc:
        raise _fail(exc, root) from None
    entries: list[dict[str, Any]] = []
    last: list[str] = []
    skip = after.split("/") if after else []

    def walk(directory: str, prefix: str, level: int, skip: list[str]) -> bool:
        """False once the page is full (and one more entry exists)."""
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            return True  # unreadable or gone: listed as an entry of its parent, nothing below it
        start = bisect.bisect_left(names, skip[0]) if skip else 0
        for name in names[start:]:
            full, rel = os.path.join(directory, name), prefix + name
            resumed = bool(skip) and name == skip[0]
            if not resumed:
                if len(entries) == limit:
                    return False
                try:
                    info = os.lstat(full)
                except OSError:
                    continue
                entries.append(_entry(rel, full, info))
                last[:] = [rel]
                is_dir = stat.S_ISDIR(info.st_mode)
            else:
                is_dir = os.path.isdir(full) and not os.path.islink(full)
            if is_dir and level < depth and not walk(full, rel + "/", level + 1, skip[1:] if resumed else []):
                return False
            skip = []
        return True

    more = not walk(root, "", 1, skip)
    return {"entries": entries, "more": more, "after": last[0] if more else None}


def _kind(mode: int) -> str:
    return "dir" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode) else (
        "link" if stat.S_ISLNK(mode) else "other")


def _entry(name: str, path: str, info: os.stat_result) -> dict[str, Any]:
    return {"name": name, "path": path, "type": _kind(info.st_mode), "size": info.st_size, "mtime": info.st_mtime}


HANDLERS = {"file_write": file_write, "file_commit": file_commit, "file_read": file_read, "list_dir": list_dir}
