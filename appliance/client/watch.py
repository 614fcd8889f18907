"""sandbox.files.watch(): the events of GET /files/watch (NDJSON) as an iterator you can stop.

    with sb.files.watch("/data", recursive=True, timeout=120) as events:
        for event in events:            # {"type": "create"|"modify"|"delete", "path": ..., "is_dir": ...}
            if event["path"].endswith("done"):
                break                   # leaving the block stops the watch in the sandbox

`overflow` events say that some were dropped; `ping` events (a quiet stream's keep-alive) are skipped; the
iterator ends at the stream's `end` event, whose reason is kept in `.end_reason`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import httpx

from .errors import ConnectionFailed


class FileWatch:
    def __init__(self, api: Any, url_path: str, params: dict[str, Any], request_timeout: float) -> None:
        self._api = api
        self._context = api.stream("GET", url_path, params=params,
                                   timeout=httpx.Timeout(request_timeout, read=None))
        try:
            self._response = self._context.__enter__()
            api.raise_for(self._response)  # a bad path fails here, at watch(), not at the first event
        except httpx.TransportError as exc:
            raise ConnectionFailed(f"cannot reach {api.url}: {exc}", code="connection") from None
        except BaseException:
            self._context.__exit__(None, None, None)
            raise
        self._lines = self._response.iter_lines()
        self.end_reason: str | None = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Events until the stream ends; iterating again goes on where the last loop stopped."""
        try:
            for line in self._lines:
                if not line.strip():
                    continue
                event = json.loads(line)
                kind = event.get("type")
                if kind == "ping":
                    continue
                if kind == "end":
                    self.end_reason = event.get("reason")
                    self.stop()
                    return
                yield event
        except httpx.TransportError as exc:
            if self._response.is_closed:  # stopped by us
                return
            raise ConnectionFailed(f"the watch stream from {self._api.url} broke: {exc}", code="connection") from None

    def stop(self) -> None:
        """End the stream: the service then stops the watch in the sandbox."""
        with contextlib.suppress(Exception):
            self._context.__exit__(None, None, None)

    def __enter__(self) -> FileWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
