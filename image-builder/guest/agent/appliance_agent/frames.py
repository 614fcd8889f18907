"""Binary payloads on the line protocol (protocol v1, additive): file contents travel raw, not as base64 JSON.

A message whose "length" field is an integer is followed, right after its newline, by exactly that many raw
bytes. Everything else is as in protocol.py: one JSON object per line. Used by the file operations:
    file_write {path, append, length} + bytes   -> ok {size}            (size of the file after the write)
    file_read  {path, offset, max}              -> ok {size, eof, length} + bytes
    list_dir   {path, limit, after}             -> ok {entries: [{name, type, size, mtime}], more, after}
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
    """Like protocol.LineReader, plus payloads: split() gives (line, payload or None) pairs, feed() decoded
    messages with the payload under PAYLOAD_KEY."""

    def __init__(self, max_line: int = 64 << 20) -> None:
        self._buffer = bytearray()
        self._max_line = max_line
        self._waiting: tuple[bytes, int] | None = None  # a line whose payload has not fully arrived

    def split(self, chunk: bytes) -> list[tuple[bytes, bytes | None]]:
        self._buffer += chunk
        frames: list[tuple[bytes, bytes | None]] = []
        while True:
            if self._waiting is not None:
                line, need = self._waiting
                if len(self._buffer) < need:
                    return frames
                frames.append((line, bytes(self._buffer[:need])))
                del self._buffer[:need]
                self._waiting = None
                continue
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > self._max_line:
                    raise protocol.ProtocolError(f"line longer than {self._max_line} bytes")
                return frames
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            if not line:
                continue
            length = _payload_length(line)
            if length is None:
                frames.append((line, None))
            else:
                self._waiting = (line, length)

    def feed(self, chunk: bytes) -> list[dict[str, Any]]:
        messages = []
        for line, payload in self.split(chunk):
            message = protocol.decode(line)
            if payload is not None:
                message[PAYLOAD_KEY] = payload
            messages.append(message)
        return messages


def _payload_length(line: bytes) -> int | None:
    """The payload length a line announces, or None. Cheap for the usual line, which has none."""
    if b'"length":' not in line:
        return None
    length = protocol.decode(line).get("length")
    if not isinstance(length, int) or isinstance(length, bool) or length < 0:
        return None
    if length > MAX_PAYLOAD:
        raise protocol.ProtocolError(f"payload of {length} bytes exceeds {MAX_PAYLOAD}")
    return length
