"""The agent's file operations beyond read, write and list: stat, remove, make_dir, rename.

Like files.py, plain functions (request in, reply out), run by the agent with the code user's rights
(codeuser.CodeUser.acting): what user code may not touch, these cannot touch either. None of them follows a link
at the last component: a link is stat'ed, removed or renamed as a link, and a recursive remove never descends
through one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from typing import Any

from appliance_agent.files import HANDLERS as _IO_HANDLERS
from appliance_agent.files import FileOpError, _entry, _fail, _path


def _not_root(path: str) -> str:
    # normpath keeps a leading "//" (POSIX leaves its meaning open): that is the root directory too
    if os.path.normpath(os.path.join(os.getcwd(), path)).strip("/") == "":
        raise FileOpError("invalid_path", f"{path}: not allowed on the root directory")
    return path


def file_stat(message: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
    """The entry at `path` itself (a link is reported as a link, with its target)."""
    path = _path(message)
    try:
        info = os.lstat(path)
        reply = _entry(os.path.basename(os.path.normpath(path)) or "/", path, info)
        reply["mode"] = stat.S_IMODE(info.st_mode)
        if stat.S_ISLNK(info.st_mode):
            reply["target"] = os.readlink(path)
    except OSError as exc:
        raise _fail(exc, path) from None
    return reply, b""


def file_remove(message: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
    """Remove a file, a link or an empty directory; with `recursive`, a directory and everything in it."""
    path = _not_root(_path(message))
    try:
        info = os.lstat(path)
        if not stat.S_ISDIR(info.st_mode):
            os.unlink(path)
        elif message.get("recursive") is True:
            shutil.rmtree(path)  # fd-based where the platform allows: never follows a link out of the tree
        else:
            os.rmdir(path)
    except OSError as exc:
        raise _fail(exc, path) from None
    return {}, b""


def file_mkdir(message: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
    """Make a directory (with `parents`, every missing one on the way, like mkdir -p). `created` is False when
    it was there already; a file in its place is already_exists."""
    path = _path(message)
    try:
        if message.get("parents") is True:
            with contextlib.suppress(FileExistsError):
                os.makedirs(path)
                return {"created": True}, b""
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                raise OSError(errno.EEXIST, "exists and is not a directory")
            return {"created": False}, b""
        os.mkdir(path)
    except OSError as exc:
        raise _fail(exc, path) from None
    return {"created": True}, b""


def file_rename(message: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
    """Move `path` to `to` (another directory or filesystem too). An existing `to` is already_exists unless
    `overwrite` (then a file is replaced in one rename; a directory only if empty, as rename(2) does)."""
    path = _not_root(_path(message))
    target = message.get("to")
    if not isinstance(target, str) or not target or "\0" in target:
        raise FileOpError("invalid_path", "to must be a non-empty path")
    try:
        os.lstat(path)
        if message.get("overwrite") is not True and os.path.lexists(target):
            raise OSError(errno.EEXIST, "already exists")
        try:
            os.rename(path, target)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            shutil.move(path, target)  # another filesystem (/tmp and /data): copies links as links
    except OSError as exc:
        name = target if exc.errno == errno.EEXIST else path
        raise _fail(exc, name) from None
    return {"path": target}, b""


def _watch_op(op: str):
    def handler(message: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
        from appliance_agent import filewatch  # first use only: ctypes costs boot time under TCG

        return filewatch.HANDLERS[op](message)

    return handler


WATCH_OPS = ("watch_start", "watch_poll", "watch_stop")
HANDLERS = {**_IO_HANDLERS, **{op: _watch_op(op) for op in WATCH_OPS}, "file_stat": file_stat,
            "file_remove": file_remove, "file_mkdir": file_mkdir, "file_rename": file_rename}
