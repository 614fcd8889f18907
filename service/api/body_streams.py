"""Request bodies as streams: which one is safe to read, and discarding what a refused request still carries."""

from __future__ import annotations

import contextlib
from typing import BinaryIO

import falcon

# A refused request's unread body is read and dropped up to this size so the connection stays usable (gunicorn
# itself drains only 64 KiB and then closes a connection whose response already promised keep-alive, which a
# client reusing it sees as "server disconnected"). Beyond it the connection closes; that cost is the sender's.
DISCARD_LIMIT = 8 << 20
_PIECE = 64 << 10


def is_chunked(req: falcon.Request) -> bool:
    return "chunked" in (req.get_header("Transfer-Encoding") or "").lower()


def body_stream(req: falcon.Request) -> BinaryIO:
    """The raw body, safe to read to its end: bounded by Content-Length, or the server's chunked reader
    (Falcon's bounded_stream treats a body without Content-Length as empty)."""
    if req.content_length is None and is_chunked(req):
        return req.stream
    return req.bounded_stream


def discard_unread(req: falcon.Request) -> None:
    if req.content_length is None and not is_chunked(req):
        return
    if req.content_length is not None and req.content_length > DISCARD_LIMIT:
        return
    with contextlib.suppress(Exception):  # a client that went away: nothing left to protect
        stream, left = body_stream(req), DISCARD_LIMIT
        while left > 0:
            piece = stream.read(min(_PIECE, left))
            if not piece:
                return
            left -= len(piece)
