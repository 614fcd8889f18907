"""The byte stream between the agent and the host, and a non-blocking writer shared with the worker pipes.

In the guest the stream is a virtio-serial port. Its Linux driver reports a missing host (nobody connected to
the chardev socket) as end-of-file on read and POLLHUP on poll, and blocks writes; that is a pause, not an
end, so the channel then stops watching the port, drops what it would write and probes it again every 20 ms
(every 100 ms after two seconds).
On stdin/stdout or a socket (tests), end-of-file is the end.
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
import time
from collections.abc import Callable

from appliance_agent import frames, protocol
from appliance_agent.loop import Loop
from appliance_agent.sysops import log

READ_SIZE = 1 << 16
# While a port has no host, it is probed (a read) this often; after RECONNECT_FAST_FOR_S without a host, less
# often, so that the many idle ports of an idle VM cost little CPU (which under TCG is not little). Probe times
# are aligned to multiples of the interval, so all waiting ports share one wake-up.
RECONNECT_PROBE_S = 0.02
RECONNECT_FAST_FOR_S = 2.0
RECONNECT_PROBE_SLOW_S = 0.1
# Beyond this much unsent data the reader is not reading; drop rather than grow without bound.
MAX_PENDING = 256 << 20


class Outbox:
    """Writes whole messages to a non-blocking descriptor, keeping what the kernel did not take yet.

    A write error other than EAGAIN drops the data and is reported to on_error once per failure.
    """

    def __init__(self, loop: Loop, fd: int, on_error: Callable[[OSError], None] | None = None) -> None:
        self._loop = loop
        self._fd = fd
        self._on_error = on_error
        self._pending = bytearray()
        self.enabled = True
        self.on_drained: Callable[[], None] | None = None  # called when pending data has all been written

    @property
    def pending(self) -> int:
        """Bytes accepted but not yet taken by the reader."""
        return len(self._pending)

    def send(self, data: bytes) -> None:
        if not self.enabled:
            return
        if self._pending:
            if len(self._pending) + len(data) > MAX_PENDING:
                log(f"dropping {len(data)} bytes: {len(self._pending)} bytes unsent")
                return
            self._pending += data
            return
        try:
            written = os.write(self._fd, data)
        except BlockingIOError:
            written = 0
        except OSError as exc:
            self._failed(exc)
            return
        if written < len(data):
            self._pending += data[written:]
            self._loop.set_writer(self._fd, self._on_writable)

    def discard(self) -> None:
        self._pending.clear()
        self._loop.set_writer(self._fd, None)

    def flush_blocking(self) -> None:
        """Best effort before exiting: wait for the reader to take what is pending."""
        self._loop.set_writer(self._fd, None)
        try:
            os.set_blocking(self._fd, True)
            while self._pending:
                del self._pending[: os.write(self._fd, self._pending)]
        except OSError:
            self._pending.clear()

    def _on_writable(self) -> None:
        try:
            written = os.write(self._fd, self._pending)
        except BlockingIOError:
            return
        except OSError as exc:
            self._failed(exc)
            return
        del self._pending[:written]
        if not self._pending:
            self._loop.set_writer(self._fd, None)
            if self.on_drained is not None:
                self.on_drained()

    def _failed(self, exc: OSError) -> None:
        self.discard()
        if self._on_error is not None:
            self._on_error(exc)


class HostChannel:
    """Reads request lines from the host and sends event messages to it.

    reconnecting=True gives the virtio-serial semantics described above; otherwise end-of-file calls
    on_closed(False) (no more requests, answers still wanted) and a broken pipe on_closed(True).
    """

    def __init__(
        self,
        loop: Loop,
        read_fd: int,
        write_fd: int,
        *,
        reconnecting: bool,
        on_line: Callable[[bytes, bytes | None], None],
        on_bad_stream: Callable[[str], None],
        on_connect: Callable[[], None],
        on_closed: Callable[[bool], None],
    ) -> None:
        self._loop = loop
        self._read_fd = read_fd
        self._write_fd = write_fd
        self.reconnecting = reconnecting
        self._on_line = on_line
        self._on_bad_stream = on_bad_stream
        self._on_connect = on_connect
        self._on_closed = on_closed
        self._reader = frames.FrameReader()
        self._outbox = Outbox(loop, write_fd, self._write_failed)
        self.connected = True
        self.closed = False
        self._disconnected_at = 0.0

    def start(self) -> None:
        for fd in {self._read_fd, self._write_fd}:
            os.set_blocking(fd, False)
        self._loop.set_reader(self._read_fd, self._on_readable)

    def send(self, message: dict) -> None:
        try:
            data = protocol.encode(message)
        except UnicodeEncodeError:
            # A lone surrogate (from a user's __repr__ or exception text) has no UTF-8 form; as a JSON
            # escape it is still valid JSON and still one line.
            data = json.dumps(message, separators=(",", ":")).encode("ascii") + b"\n"
        self._outbox.send(data)

    def send_encoded(self, data: bytes) -> None:
        """A message already encoded as one protocol line."""
        self._outbox.send(data)

    def close(self) -> None:
        self._outbox.flush_blocking()

    # -- reading -------------------------------------------------------------------------------------------

    def _on_readable(self) -> None:
        data = self._read()
        if data:
            self._feed(data)

    def _read(self) -> bytes | None:
        """Data, or None if there is nothing now; handles end-of-file (or a hang-up) itself."""
        try:
            data = os.read(self._read_fd, READ_SIZE)
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno != errno.EIO:  # EIO: a pty whose other side is closed, i.e. disconnected
                log(f"reading the host channel: {exc}")
            data = b""
        if not data:
            self._end_of_file()
            return None
        return data

    def _feed(self, data: bytes) -> None:
        try:
            lines = self._reader.split(data)
        except protocol.ProtocolError as exc:
            self._reader = frames.FrameReader()
            self._on_bad_stream(str(exc))
            return
        for line, payload in lines:
            self._on_line(line, payload)

    def _end_of_file(self) -> None:
        if not self.reconnecting:
            self._loop.set_reader(self._read_fd, None)
            self._on_closed(False)
            return
        if self.connected:
            self.connected = False
            self._disconnected_at = time.monotonic()
            self._outbox.enabled = False
            self._outbox.discard()
            self._reader = frames.FrameReader()  # a half line from the old connection means nothing now
        # Do not watch the port while nobody is there: poll would report POLLHUP at once, forever.
        self._loop.set_reader(self._read_fd, None)
        self._loop.set_writer(self._write_fd, None)
        self._schedule_probe()

    def _schedule_probe(self) -> None:
        now = time.monotonic()
        fast = now - self._disconnected_at < RECONNECT_FAST_FOR_S
        interval = RECONNECT_PROBE_S if fast else RECONNECT_PROBE_SLOW_S
        delay = (math.floor(now / interval) + 1) * interval - now
        self._loop.call_later(("reconnect", self._read_fd), delay, self._probe)

    def _probe(self) -> None:
        try:
            data = os.read(self._read_fd, READ_SIZE)
        except BlockingIOError:
            data = None
        except OSError:
            data = b""
        if data == b"":
            self._schedule_probe()
            return
        self.connected = True
        self._outbox.enabled = True
        self._loop.set_reader(self._read_fd, self._on_readable)
        self._on_connect()
        if data:
            self._feed(data)

    def _write_failed(self, exc: OSError) -> None:
        if exc.errno in (errno.EPIPE, errno.ECONNRESET) and not self.reconnecting:
            self._on_closed(True)
        # Otherwise (host away, EAGAIN turned error) the message is dropped; the host pings when it is back.


def open_channel(path: str | None = None, fd: int | None = None, stdio: bool = False) -> tuple[int, int, bool]:
    """(read_fd, write_fd, reconnecting) for a channel given on the command line.

    A character device (a virtio port, or a pty in tests) gets the reconnecting semantics.
    """
    if stdio:
        return 0, 1, False
    if fd is not None:
        return fd, fd, stat.S_ISCHR(os.fstat(fd).st_mode)
    assert path is not None
    mode = os.stat(path).st_mode
    if stat.S_ISSOCK(mode):
        import socket  # tests only

        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        connected = sock.detach()
        return connected, connected, False
    channel_fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    return channel_fd, channel_fd, stat.S_ISCHR(mode)
