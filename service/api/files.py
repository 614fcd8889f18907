"""/v1/sandboxes/{id}/files: streamed upload and download, and directory listing (/files/list).

Neither direction holds a whole file: uploads are read from the request in CHUNK-sized pieces and handed on as
they arrive; downloads are sent as the sandbox produces them, with Content-Length known up front.
"""

from __future__ import annotations

from collections.abc import Iterator

import falcon
from appliance_agent.files import DEFAULT_PAGE as LIST_PAGE
from appliance_agent.files import MAX_DEPTH as MAX_LIST_DEPTH
from appliance_agent.files import MAX_PAGE as MAX_LIST_PAGE

from service.errors import TooLarge

from .body_streams import body_stream
from .error_responses import InvalidField

CHUNK = 1 << 20
MAX_NAME_BYTES = 255  # NAME_MAX: a cursor is a name
MAX_PATH_BYTES = 4096  # PATH_MAX: a cursor of a recursive listing is a relative path


def _path(req: falcon.Request, default: str | None = None) -> str:
    path = req.get_param("path") or default
    if not path:
        raise InvalidField("path", "is required: the file's path in the sandbox, e.g. ?path=/data/in.csv")
    if "\x00" in path:
        raise InvalidField("path", "must not contain NUL bytes")
    return path


def flag(req: falcon.Request, name: str) -> bool:
    value = req.get_param(name)
    if value is None or value in {"false", "0"}:
        return False
    if value in {"true", "1"}:
        return True
    raise InvalidField(name, "must be true or false")


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

    def on_delete(self, req: falcon.Request, resp: falcon.Response, sandbox_id: str) -> None:
        """A file, a link (not what it points to) or an empty directory; with recursive=true any directory."""
        self._manager.remove_file(req.context.owner, sandbox_id, _path(req), flag(req, "recursive"))
        resp.status = falcon.HTTP_204


class FileList:
    """A directory, one page at a time (a guest directory may hold any number of entries): at most `limit`
    entries in name order, `more` if entries remain, and the `cursor` that asks for the next page. With `depth`
    > 1 the listing is recursive: each directory's entries follow it, named by their path relative to `path`."""

    def __init__(self, manager) -> None:
        self._manager = manager

    def on_get(self, req: falcon.Request, resp: falcon.Response, sandbox_id: str) -> None:
        path = _path(req, default="/")
        limit = req.get_param("limit")
        if limit is None:
            limit = LIST_PAGE
        elif not limit.isdigit() or not 1 <= int(limit) <= MAX_LIST_PAGE:
            raise InvalidField("limit", f"must be an integer from 1 to {MAX_LIST_PAGE}")
        depth = req.get_param("depth")
        if depth is None:
            depth = "1"
        elif not depth.isdigit() or not 1 <= int(depth) <= MAX_LIST_DEPTH:
            raise InvalidField("depth", f"must be an integer from 1 to {MAX_LIST_DEPTH}")
        cursor = req.get_param("cursor")
        if cursor is not None and ("\x00" in cursor or len(cursor.encode()) > MAX_PATH_BYTES or (
                depth == "1" and ("/" in cursor or len(cursor.encode()) > MAX_NAME_BYTES))):
            raise InvalidField("cursor", "must be the cursor of the previous page (a name in the directory)")
        page = self._manager.list_dir(req.context.owner, sandbox_id, path, int(limit), cursor, int(depth))
        resp.media = {"path": path, **page}
