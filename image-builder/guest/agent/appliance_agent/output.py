"""Per-exec accounting of a program's stdout and stderr: the byte cap, UTF-8 decoding, coalescing.

Bytes over the cap are only counted, never decoded, so a flood costs little more than the reads. Kept bytes
go through one incremental decoder per stream, so a multi-byte character split across two reads survives and
invalid bytes become U+FFFD. Consecutive pieces of the same stream are merged into one event; the relative
order of stdout and stderr pieces, as the agent saw them, is kept.
"""

from __future__ import annotations

import codecs

from appliance_agent import protocol

STREAMS = ("stdout", "stderr")
_Decoder = codecs.getincrementaldecoder("utf-8")


class OutputSink:
    def __init__(self, cap: int) -> None:
        self._remaining = cap
        self.dropped = 0
        self._decoders: dict[str, codecs.IncrementalDecoder] = {}  # made on first output: most execs print nothing
        self._pending: list[list[str]] = []
        self.pending_chars = 0
        self.quiet = True  # nothing was fed: the exec printed nothing

    def feed(self, stream: str, data: bytes) -> None:
        self.quiet = False
        if self._remaining <= 0:
            self.dropped += len(data)
            return
        if len(data) > self._remaining:
            self.dropped += len(data) - self._remaining
            data = data[: self._remaining]
        self._remaining -= len(data)
        self._append(stream, self._decoder(stream).decode(data))

    def take(self) -> list[tuple[str, str]]:
        """The pieces waiting to be sent, in order, as (stream, text)."""
        if not self._pending:
            return []
        pieces = [(stream, text) for stream, text in self._pending]
        self._pending = []
        self.pending_chars = 0
        return pieces

    def close(self) -> list[tuple[str, str]]:
        """The last pieces: decoder leftovers (an incomplete character) and the truncation marker."""
        for stream, decoder in self._decoders.items():
            self._append(stream, decoder.decode(b"", final=True))
        if self.dropped:
            self._append("stderr", protocol.TRUNCATION_MARKER.format(omitted=self.dropped))
        return self.take()

    def _decoder(self, stream: str) -> codecs.IncrementalDecoder:
        decoder = self._decoders.get(stream)
        if decoder is None:
            decoder = self._decoders[stream] = _Decoder(errors="replace")
        return decoder

    def _append(self, stream: str, text: str) -> None:
        if not text:
            return
        self.pending_chars += len(text)
        if self._pending and self._pending[-1][0] == stream:
            self._pending[-1][1] += text
        else:
            self._pending.append([stream, text])
