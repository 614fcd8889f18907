"""A bounded ring of a command's output: stdout and stderr pieces in the order the agent read them, addressed by
absolute byte offsets into the whole output, so a client that lost its connection reads on from where it was.

When the ring is full the oldest bytes go; a read from an offset that is gone starts at the oldest byte still held
and says how many bytes it skipped (dropped). Offsets never repeat or move: the n-th byte of the output keeps its
offset for the command's life. Pieces are kept as bytes; a read decodes them (invalid UTF-8, or a character split
by the ring's edge or by `max`, becomes U+FFFD).
"""

from __future__ import annotations

from collections import deque

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class OutputRing:
    def __init__(self, cap: int) -> None:
        if cap <= 0:
            raise ValueError("a ring needs room for at least one byte")
        self.cap = cap
        self._pieces: deque[list[Any]] = deque()  # [start offset, stream, bytes]
        self.start = 0  # offset of the oldest byte held
        self.end = 0  # offset after the newest byte: the total written so far
        self.dropped = 0  # bytes pushed out of the ring so far

    def append(self, stream: str, data: bytes) -> None:
        if not data:
            return
        if len(data) > self.cap:  # only its tail can ever be read
            skipped = len(data) - self.cap
            self._pieces.clear()
            self.dropped += self.end - self.start + skipped
            self.end += skipped
            self.start = self.end
            data = data[skipped:]
        last = self._pieces[-1] if self._pieces else None
        if last is not None and last[1] == stream and len(last[2]) < 1 << 16:
            last[2] += data  # merge small pieces of one stream: fewer events per read
        else:
            self._pieces.append([self.end, stream, bytearray(data)])
        self.end += len(data)
        self._trim()

    def _trim(self) -> None:
        excess = (self.end - self.start) - self.cap
        while excess > 0:
            first = self._pieces[0]
            if len(first[2]) <= excess:
                self._pieces.popleft()
                excess -= len(first[2])
                self.dropped += len(first[2])
                self.start += len(first[2])
                continue
            del first[2][:excess]
            first[0] += excess
            self.dropped += excess
            self.start += excess
            excess = 0

    def read(self, offset: int, limit: int) -> tuple[list[tuple[str, str]], int, int, int]:
        """Up to `limit` bytes from `offset`: ([(stream, text)], offset of the first byte read, next offset,
        bytes skipped because they were dropped). An offset past the end reads nothing, from the end."""
        offset = max(0, min(offset, self.end))
        skipped = 0
        if offset < self.start:
            skipped, offset = self.start - offset, self.start
        pieces: list[tuple[str, str]] = []
        position = offset
        for start, stream, data in self._pieces:
            if limit <= 0:
                break
            stop = start + len(data)
            if stop <= position:
                continue
            chunk = bytes(data[position - start : position - start + limit])
            pieces.append((stream, chunk.decode("utf-8", errors="replace")))
            position += len(chunk)
            limit -= len(chunk)
        return pieces, offset, position, skipped
