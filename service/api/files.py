"""/v1/sandboxes/{id}/files: streamed upload and download, and directory listing (/files/list).

Neither direction holds a whole file: uploads are read from the request in CHUNK-sized pieces and handed on as
they arrive; downloads are sent as the sandbox produces them, with Content-Length known up front.
"""

from __future__ import annotations

from collections.abc import Iterator

import falcon

from service.errors import TooLarge

from .body_streams import body_stream
from .error_responses import InvalidField

CHUNK = 1 << 20


def _path(req: falcon.Request, default: str | None = None) -> str:
    path = req.get_param("path") or default
    if not path:
        raise InvalidField("path", "is required: the file's path in the sandbox, e.g. ?path=/data/in.csv")
    if "\x00" in path:
        raise InvalidField("path", "must not contain NUL bytes")
    return path


def _chunks(stream, limit: int) -> Iterator[bytes]:
    total = 0
    while True:
        chunk = stream.read(CHUNK)
        if not chunk:
            return
        total += len(chunk)
        if total > limit:
            raise TooLarge(f"the upload exceeds the {limit}-byte limit (service.max_file_bytes)")
        yield chunk


class Files:
    def __init__(self, manager, max_file_bytes: int) -> None:
        self._manager = manager
        self.max_body_bytes = max_file_bytes  # read by the BodyLimit middleware

    def on_put(self, req: falcon.Request, resp: falcon.Response, sandbox_id: str) -> None:
        path = _path(req)
        self._manager.get(req.context.owner, sandbox_id)  # 404 before reading a byte of someone else's upload
        info = self._manager.write_file(
            req.context.owner, sandbox_id, path, _chunks(body_stream(req), self.max_body_bytes)
        )
        resp.media = info

    def on_get(self, req: falcon.Request, resp: falcon.Response, sandbox_id: str) -> None:
        size, chunks = self._manager.read_file(req.context.owner, sandbox_id, _path(req))
        resp.content_type = "application/octet-stream"
        resp.content_length = size
        resp.stream = chunks


class FileList:
    def __init__(self, manager) -> None:
        self._manager = manager

    def on_get(self, req: falcon.Request, resp: falcon.Response, sandbox_id: str) -> None:
        path = _path(req, default="/")
        resp.media = {"path": path, "entries": self._manager.list_dir(req.context.owner, sandbox_id, path)}
