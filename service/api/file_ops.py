"""/v1/sandboxes/{id}/files/...: stat, make_dir, rename and watch; DELETE /files is Files.on_delete (files.py).

Every operation acts in the guest with the code user's rights (the agent's file ops), so a path names what user
code could reach, and a link user code planted cannot lead the agent to its own files.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

import falcon
from pydantic import Field, field_validator

from service import file_watch
from service.errors import LimitReached

from .files import _path, flag
from .request_models import _Body, json_number, parse, read_json

NDJSON = "application/x-ndjson"
MAX_BODY = 16 << 10  # two paths and two flags
MAX_PATH_CHARS = 4096
# Watch streams this process serves at once: each holds one of the worker's threads for its whole duration.
MAX_WATCH_STREAMS = 4


class MakeDirRequest(_Body):
    path: str = Field(..., min_length=1, max_length=MAX_PATH_CHARS, pattern="^[^\\x00]+$",
                      description="the directory to make, e.g. /data/out/2024")
    parents: bool = Field(True, strict=True, description="make missing parents too (mkdir -p); an existing "
                          "directory is then no error")


class RenameRequest(_Body):
    path: str = Field(..., min_length=1, max_length=MAX_PATH_CHARS, pattern="^[^\\x00]+$",
                      description="what to move (a file, link or directory)")
    to: str = Field(..., min_length=1, max_length=MAX_PATH_CHARS, pattern="^[^\\x00]+$",
                    description="its new path (may be in another directory)")
    overwrite: bool = Field(False, strict=True, description="replace an existing file at `to` (else 409 "
                            "already_exists)")


class FileStat:
    def __init__(self, manager) -> None:
        self._manager = manager

    def on_get(self, req: falcon.Request, resp: falcon.Response, sandbox_id: str) -> None:
        resp.media = self._manager.stat_file(req.context.owner, sandbox_id, _path(req))


class MakeDir:
    max_body_bytes = MAX_BODY

    def __init__(self, manager) -> None:
        self._manager = manager

    def on_post(self, req: falcon.Request, resp: falcon.Response, sandbox_id: str) -> None:
        body = parse(MakeDirRequest, read_json(req, MAX_BODY))
        created = self._manager.make_dir(req.context.owner, sandbox_id, body.path, body.parents)
        resp.status = falcon.HTTP_201 if created else falcon.HTTP_200
        resp.media = {"path": body.path, "created": created}


class Rename:
    max_body_bytes = MAX_BODY

    def __init__(self, manager) -> None:
        self._manager = manager

    def on_post(self, req: falcon.Request, resp: falcon.Response, sandbox_id: str) -> None:
        body = parse(RenameRequest, read_json(req, MAX_BODY))
        self._manager.rename_file(req.context.owner, sandbox_id, body.path, body.to, body.overwrite)
        resp.media = {"path": body.to}


class _Duration(_Body):
    timeout_s: float = Field(file_watch.DEFAULT_DURATION_S, gt=0, le=file_watch.MAX_DURATION_S)

    _number = field_validator("timeout_s", mode="before")(json_number)


class Watch:
    """An NDJSON stream of create/modify/delete events under a directory (see service/file_watch.py)."""

    def __init__(self, manager, max_streams: int = MAX_WATCH_STREAMS) -> None:
        self._manager = manager
        self._slots = threading.BoundedSemaphore(max_streams)
        self._max_streams = max_streams

    def on_get(self, req: falcon.Request, resp: falcon.Response, sandbox_id: str) -> None:
        path, recursive = _path(req), flag(req, "recursive")
        raw = req.get_param("timeout_s")
        duration = parse(_Duration, {} if raw is None else {"timeout_s": _float(raw)}).timeout_s
        if not self._slots.acquire(blocking=False):
            raise LimitReached(f"this service process already serves {self._max_streams} watch streams; retry "
                               "later", retry_after=5)
        try:
            events = self._manager.watch_files(req.context.owner, sandbox_id, path, recursive, duration)
        except BaseException:
            self._slots.release()
            raise
        resp.content_type = NDJSON
        resp.stream = _Lines(events, self._slots.release)


class _Lines:
    """The stream's body. The server calls close() when the response ends or the client goes, even before the
    first line (a generator's own `finally` would not run then): the guest watch is stopped, the slot freed."""

    def __init__(self, events: Iterator[dict[str, Any]], release: Callable[[], None]) -> None:
        self._events = events
        self._release: Callable[[], None] | None = release

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> bytes:
        return json.dumps(next(self._events), ensure_ascii=False).encode() + b"\n"

    def close(self) -> None:
        try:
            self._events.close()  # type: ignore[attr-defined]
        finally:
            if self._release is not None:
                self._release, release = None, self._release
                release()


def _float(raw: str) -> Any:
    try:
        return float(raw)
    except ValueError:
        return raw  # refused by the model, naming the field
