"""Watching a directory for create/modify/delete events (inotify), for the host's NDJSON watch stream.

The host starts a watch (watch_start), then asks for what happened since (watch_poll) until it stops it
(watch_stop). Nothing here runs between polls: events wait in the kernel's inotify queue and are read at the next
poll, so a watch costs the agent no wake-ups. Everything is bounded: watches per sandbox, watched directories per
watch (a recursive watch adds one per subdirectory), events kept per watch (past it, events are dropped and the
next poll says `overflow`), events per reply. A watch the host stopped polling (its stream ended, the service
died) is dropped after IDLE_S.

Imported on first use (ctypes costs boot time under TCG). Runs with the code user's rights like every file op:
a watch is only placed where that user may read, and links are never followed.
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import stat
import struct
import time
from collections import deque
from typing import Any

from appliance_agent.files import FileOpError, _fail, _path

MAX_WATCHES = 8
MAX_DIRS = 1024  # per watch
MAX_QUEUE = 4096  # events kept per watch between polls
MAX_REPLY = 500  # events per poll reply: a reply stays well under the frame limit
IDLE_S = 60.0

_IN_MODIFY, _IN_CLOSE_WRITE, _IN_MOVED_FROM, _IN_MOVED_TO = 0x2, 0x8, 0x40, 0x80
_IN_CREATE, _IN_DELETE, _IN_DELETE_SELF, _IN_MOVE_SELF = 0x100, 0x200, 0x400, 0x800
_IN_Q_OVERFLOW, _IN_IGNORED, _IN_ISDIR = 0x4000, 0x8000, 0x40000000
_IN_ONLYDIR, _IN_DONT_FOLLOW, _IN_EXCL_UNLINK = 0x01000000, 0x02000000, 0x04000000
_MASK = (_IN_MODIFY | _IN_MOVED_FROM | _IN_MOVED_TO | _IN_CREATE | _IN_DELETE | _IN_DELETE_SELF | _IN_MOVE_SELF
         | _IN_ONLYDIR | _IN_DONT_FOLLOW | _IN_EXCL_UNLINK)
_HEADER = struct.Struct("iIII")

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int) -> int:
    if result < 0:
        number = ctypes.get_errno()
        raise OSError(number, os.strerror(number))
    return result


def kind_of(mask: int) -> str | None:
    """The event type a stream shows for an inotify mask, or None for one it does not show."""
    if mask & (_IN_CREATE | _IN_MOVED_TO):
        return "create"
    if mask & (_IN_DELETE | _IN_MOVED_FROM | _IN_DELETE_SELF | _IN_MOVE_SELF):
        return "delete"
    if mask & _IN_MODIFY:
        return "modify"
    return None


def parse(buffer: bytes) -> list[tuple[int, int, str]]:
    """(wd, mask, name) of each event in a read of an inotify descriptor."""
    events, offset = [], 0
    while offset + _HEADER.size <= len(buffer):
        wd, mask, _cookie, length = _HEADER.unpack_from(buffer, offset)
        offset += _HEADER.size
        name = buffer[offset:offset + length].split(b"\0", 1)[0].decode(errors="surrogateescape")
        offset += length
        events.append((wd, mask, name))
    return events


class Watch:
    def __init__(self, root: str, recursive: bool) -> None:
        self.root = root
        self.recursive = recursive
        self.fd = _check(_libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC))
        self.dirs: dict[int, str] = {}  # watch descriptor -> directory path
        self.queue: deque[dict[str, Any]] = deque()
        self.overflow = False
        self.ended = False  # the watched directory itself is gone
        self.polled = time.monotonic()

    def close(self) -> None:
        os.close(self.fd)

    def add(self, directory: str, announce: bool) -> None:
        """Watch `directory` (and, recursively, the ones below it). `announce`: queue a create for what is in it
        already (a directory made while unwatched may have been filled before its watch was placed)."""
        if len(self.dirs) >= MAX_DIRS:
            self.overflow = True
            return
        wd = _libc.inotify_add_watch(self.fd, os.fsencode(directory), _MASK)
        if wd < 0:
            return  # gone already, or not the user's to read: its parent's events still show it
        self.dirs[wd] = directory
        if not (self.recursive or announce):
            return
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            return
        for name in names:
            full = os.path.join(directory, name)
            is_dir = os.path.isdir(full) and not os.path.islink(full)
            if announce:
                self.push("create", full, is_dir)
            if is_dir and self.recursive:
                self.add(full, announce)

    def push(self, kind: str, path: str, is_dir: bool) -> None:
        if self.queue and self.queue[-1]["type"] == kind == "modify" and self.queue[-1]["path"] == path:
            return  # a burst of writes to one file is one modify until something else happens
        if len(self.queue) >= MAX_QUEUE:
            self.overflow = True
            return
        self.queue.append({"type": kind, "path": path, "is_dir": is_dir})

    def drain(self) -> None:
        while True:
            try:
                buffer = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return
            if not buffer:
                return
            for wd, mask, name in parse(buffer):
                self._on_event(wd, mask, name)

    def _on_event(self, wd: int, mask: int, name: str) -> None:
        if mask & _IN_Q_OVERFLOW:
            self.overflow = True
            return
        directory = self.dirs.get(wd)
        if directory is None:
            return
        if mask & _IN_IGNORED:
            del self.dirs[wd]
            return
        if mask & (_IN_DELETE_SELF | _IN_MOVE_SELF):
            if directory == self.root:  # what is below it was reported by its own directory's events
                self.push("delete", directory, True)
                self.ended = True
            return
        kind = kind_of(mask)
        if kind is None or not name:
            return
        full = os.path.join(directory, name)
        is_dir = bool(mask & _IN_ISDIR)
        self.push(kind, full, is_dir)
        if kind == "create" and is_dir and self.recursive:
            self.add(full, announce=True)


_watches: dict[str, Watch] = {}


def _expire() -> None:
    now = time.monotonic()
    for key, watch in list(_watches.items()):
        if now - watch.polled > IDLE_S:
            watch.close()
            del _watches[key]


def _get(message: dict[str, Any]) -> tuple[str, Watch]:
    key = message.get("watch")
    watch = _watches.get(key) if isinstance(key, str) else None
    if watch is None:
        raise FileOpError("not_found", f"no watch {key!r} (stopped, or idle for more than {IDLE_S:.0f} s)")
    return key, watch  # type: ignore[return-value]


def watch_start(message: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
    path = _path(message)
    _expire()
    if len(_watches) >= MAX_WATCHES:
        raise FileOpError("limit_reached", f"{path}: this sandbox already has {MAX_WATCHES} watches")
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            raise OSError(errno.ENOTDIR, "not a directory")
        watch = Watch(os.path.abspath(path), message.get("recursive") is True)
    except OSError as exc:
        raise _fail(exc, path) from None
    try:
        watch.add(watch.root, announce=False)
        if not watch.dirs:
            raise OSError(errno.EACCES, "cannot watch it")
    except OSError as exc:
        watch.close()
        raise _fail(exc, path) from None
    if watch.overflow:
        watch.close()
        raise FileOpError("limit_reached", f"{path}: more than {MAX_DIRS} directories to watch; watch a deeper one")
    key = secrets.token_hex(8)
    _watches[key] = watch
    return {"watch": key, "path": watch.root}, b""


def watch_poll(message: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
    """What happened since the last poll: at most MAX_REPLY events (`more` if others wait), `overflow` if some
    were lost, `ended` if the watched directory is gone (the watch is then stopped once its events are sent)."""
    key, watch = _get(message)
    watch.polled = time.monotonic()
    watch.drain()
    events = [watch.queue.popleft() for _ in range(min(MAX_REPLY, len(watch.queue)))]
    overflow, watch.overflow = watch.overflow, False
    ended = watch.ended and not watch.queue
    if ended:
        watch.close()
        del _watches[key]
    return {"events": events, "overflow": overflow, "more": bool(watch.queue), "ended": ended}, b""


def watch_stop(message: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
    key = message.get("watch")
    watch = _watches.pop(key, None) if isinstance(key, str) else None
    if watch is not None:
        watch.close()
    _expire()
    return {"stopped": watch is not None}, b""


HANDLERS = {"watch_start": watch_start, "watch_poll": watch_poll, "watch_stop": watch_stop}
