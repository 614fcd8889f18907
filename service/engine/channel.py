"""The host end of the agent protocol: one unix-socket connection to a VM's virtio-serial port."""

from __future__ import annotations

import itertools
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from appliance_agent import frames, protocol

from .errors import AgentProtocolError, AgentTimeout, SandboxLost

_SEND_TIMEOUT_S = 30.0
# The longest line the host accepts from a guest: one display (an image) or one output chunk. A guest that sends
# more is refused, not buffered.
MAX_LINE = 16 << 20


class AgentChannel:
    """Requests go out under a lock (interrupt may come from another thread); one reader consumes events."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._readable = select.poll()
        self._readable.register(sock, select.POLLIN)
        self._writable = select.poll()
        self._writable.register(sock, select.POLLOUT)
        self._reader = frames.FrameReader(MAX_LINE)
        self._pending: deque[dict[str, Any]] = deque()
        self._ready = False  # once the agent has answered, a malformed frame is the guest's, not boot noise
        self._send_lock = threading.Lock()
        self._ids = itertools.count(1)
        self.agent_info: dict[str, Any] = {}

    @classmethod
    def connect(cls, path: Path, deadline: float) -> AgentChannel:
        """Connect to QEMU's chardev socket, retrying until QEMU has created it or the deadline passes."""
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(str(path))
                return cls(sock)
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if time.monotonic() > deadline:
                    raise AgentTimeout(f"agent socket {path} did not appear in time") from None
                time.sleep(0.002)

    def close(self) -> None:
        self._sock.close()

    def send(self, op: str, payload: bytes = b"", **args: Any) -> int:
        """Send one request (with raw payload bytes after it, for file contents); returns its id."""
        request_id = next(self._ids)
        data = memoryview(frames.encode(protocol.request(request_id, op, **args), payload))
        # The socket stays non-blocking: the reader waits with poll() and its own deadline, and a sender must not
        # block forever on a guest that stopped reading (QEMU reads the socket only while the guest port is open).
        deadline = time.monotonic() + _SEND_TIMEOUT_S
        with self._send_lock:
            while data:
                try:
                    sent = self._sock.send(data)
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise SandboxLost("the guest stopped reading requests (its agent is hung)") from None
                    self._writable.poll(50)
                    continue
                except OSError as exc:
                    raise SandboxLost(f"the VM's agent connection broke: {exc}") from None
                data = data[sent:]
        return request_id

    def wait_ready(self, deadline: float, ping_every: float = 1.0) -> dict[str, Any]:
        """Ping until the agent answers. Bytes sent before the guest opened its port wait in the socket and
        arrive later, and the agent says hello whenever a host connects, so a slow resend is only a fallback."""
        next_ping = 0.0
        while True:
            now = time.monotonic()
            if now >= deadline:
                raise AgentTimeout("the guest agent did not answer before the boot deadline")
            if now >= next_ping:
                self.send("ping")
                next_ping = now + ping_every
            message = self._next_message(min(deadline, next_ping))
            if message is not None and message.get("ev") in {"pong", "hello"}:
                self.agent_info = message
                self._pending.clear()  # answers to our earlier pings
                self._ready = True
                return message

    def events(self, request_id: int, deadline: float | None) -> Iterator[dict[str, Any]]:
        """Events answering `request_id` until (and including) its final one: done, ok, pong or error."""
        while True:
            message = self._next_message(deadline)
            if message is None:
                raise AgentTimeout("the guest agent stopped answering")
            if message.get("id") != request_id:
                continue  # a late answer to an earlier request (an interrupt's ok, a stray pong)
            yield message
            if message.get("ev") in {"done", "ok", "pong", "error"}:
                return

    def call(self, op: str, deadline: float | None, payload: bytes = b"", **args: Any) -> dict[str, Any]:
        """A request with a single answer (its payload, if any, under frames.PAYLOAD_KEY)."""
        request_id = self.send(op, payload, **args)
        final: dict[str, Any] = {}
        for final in self.events(request_id, deadline):  # noqa: B007 - the last event is the answer
            pass
        return final

    def _next_message(self, deadline: float | None) -> dict[str, Any] | None:
        """The next message, or None at the deadline. SandboxLost if the connection closed."""
        while not self._pending:
            try:
                chunk = self._sock.recv(1 << 16)
            except BlockingIOError:
                timeout = None if deadline is None else deadline - time.monotonic()
                if timeout is not None and timeout <= 0:
                    return None
                self._readable.poll(None if timeout is None else max(1, int(timeout * 1000) + 1))
                continue
            except OSError as exc:
                raise SandboxLost(f"the VM's agent connection broke: {exc}") from None
            if not chunk:
                raise SandboxLost("the VM closed its agent connection (it stopped or crashed)")
            try:
                self._pending.extend(self._reader.feed(chunk))
            except protocol.ProtocolError as exc:
                self._reader = frames.FrameReader(MAX_LINE)  # start afresh at the next frame
                if self._ready:  # not boot noise: something in the guest wrote a frame the protocol forbids
                    raise AgentProtocolError(f"the guest sent a malformed frame: {str(exc)[:200]}") from None
        return self._pending.popleft()
