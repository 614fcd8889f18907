"""Binary payloads on the line protocol (protocol v1, additive): file contents travel raw, not as base64 JSON.

A message whose "length" field is an integer is followed, right after its newline, by exactly that many raw
bytes. Everything else is as in protocol.py: one JSON object per line. Used by the file operations:
    file_write {path, append, length} + bytes   -> ok {size}            (size of the file after the write)
    file_read  {path, offset, max}              -> ok {size, eof, length} + bytes
    list_dir   {path}                           -> ok {entries: [{name, type, size, mtime}]}
Relative paths are relative to the agent's working directory (/data in the guest). A failure is
error {code, message} with code one of FILE_ERRORS.
"""

from __future__ import annotations

from typing import Any

from appliance_agent import protocol

FILE_OPS = frozenset({"file_write", "file_read", "list_dir"})
FILE_ERRORS = frozenset({"not_found", "is_a_directory", "not_a_directory", "permission_denied", "io_error"})
MAX_PAYLOAD = 8 << 20  # one frame's payload; files are moved in many frames
PAYLOAD_KEY = "_payload"  # where a decoded message carries its raw bytes


def encode(message: dict[str, Any], payload: bytes = b"") -> bytes:
    """A message and its payload (if any) as the bytes to write, in one piece (one write keeps them together)."""
    if payload:
        message = {**message, "length": len(payload)}
    return protocol.encode(message) + payload


class FrameReader:
    """Like protocol.LineReader, but returns decoded messages, each with its payload under PAYLOAD_KEY."""

    def __init__(self, max_line: int = 64 << 20) -> None:
        self._buffer = bytearray()
        self._max_line = max_line
        self._waiting: dict[str, Any] | None = None  # a message whose payload has not fully arrived

    def feed(self, chunk: bytes) -> list[dict[str, Any]]:
        self._buffer += chunk
        messages: list[dict[str, Any]] = []
        while True:
            if self._waiting is not None:
                need = self._waiting["length"]
                if len(self._buffer) < need:
                    return messages
                self._waiting[PAYLOAD_KEY] = bytes(self._buffer[:need])
                del self._buffer[:need]
                messages.append(self._waiting)
                self._waiting = None
                continue
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > self._max_line:
                    raise protocol.ProtocolError(f"line longer than {self._max_line} bytes")
                return messages
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            if not line:
                continue
            message = protocol.decode(line)
            length = message.get("length")
            if isinstance(length, int) and not isinstance(length, bool) and length >= 0:
                if length > MAX_PAYLOAD:
                    raise protocol.ProtocolError(f"payload of {length} bytes exceeds {MAX_PAYLOAD}")
                self._waiting = message
                continue
            messages.append(message)
