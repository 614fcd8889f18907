"""Slow clients (slowloris) against a TLS endpoint, and a health check timed while they hold their connections.

Each slow client completes the TLS handshake, then sends a request's headers one byte at a time and never finishes
them; it stops when the server closes the connection or when told to. Stdlib only: testinfra runs it from the
control machine, and a developer can run it against any node by hand:

    python slowclients.py HOST PORT CA_FILE [CLIENTS]
"""

from __future__ import annotations

import socket
import ssl
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field

HEADERS = b"GET /v1/healthz HTTP/1.1\r\nHost: node\r\nUser-Agent: slow-client\r\nX-Padding: " + b"a" * 4000


@dataclass
class SlowClients:
    host: str
    port: int
    context: ssl.SSLContext
    count: int
    byte_interval_s: float = 0.25
    connected: int = 0
    cut_by_server: int = 0  # connections the server closed (timeout or limit)
    refused: int = 0  # connections closed before the TLS handshake finished (per-client limit)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        for _ in range(self.count):
            thread = threading.Thread(target=self._one, daemon=True)
            thread.start()
            self._threads.append(thread)

    def wait_connected(self, expected: int, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if self.connected + self.refused >= expected:
                    return
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def _count(self, name: str) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)

    def _one(self) -> None:
        try:
            raw = socket.create_connection((self.host, self.port), timeout=30)
        except OSError:
            self._count("refused")
            return
        try:
            try:
                stream = self.context.wrap_socket(raw, server_hostname=self.host)
            except (OSError, ssl.SSLError):
                self._count("refused")
                return
            self._count("connected")
            for byte in HEADERS:
                if self._stop.wait(self.byte_interval_s):
                    return
                try:
                    stream.sendall(bytes([byte]))
                except OSError:
                    self._count("cut_by_server")
                    return
            # every byte sent without the closing blank line: wait until cut or told to stop
            stream.settimeout(self.byte_interval_s)
            while not self._stop.is_set():
                try:
                    if not stream.recv(4096):
                        self._count("cut_by_server")
                        return
                except TimeoutError:
                    continue
                except OSError:
                    self._count("cut_by_server")
                    return
        finally:
            raw.close()


def timed_health_check(url: str, context: ssl.SSLContext, timeout_s: float = 60) -> tuple[int, float]:
    """(HTTP status, seconds) of one GET on a fresh connection."""
    started = time.monotonic()
    with urllib.request.urlopen(url, timeout=timeout_s, context=context) as response:
        response.read()
        return response.status, time.monotonic() - started


if __name__ == "__main__":
    host, port, ca = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    count = int(sys.argv[4]) if len(sys.argv) > 4 else 64
    context = ssl.create_default_context(cafile=ca)
    clients = SlowClients(host, port, context, count)
    clients.start()
    clients.wait_connected(count)
    try:
        for _ in range(5):
            status, seconds = timed_health_check(f"https://{host}:{port}/v1/healthz", context)
            print(f"healthz {status} in {seconds * 1000:.0f} ms with {clients.connected} slow clients connected")
            time.sleep(1)
    finally:
        clients.stop()
    print(f"connected {clients.connected}, refused {clients.refused}, cut by the server {clients.cut_by_server}")
