"""HAProxy's agent check on a node: a TCP port that answers each connection with one line, the node's free capacity
as a weight (`up N%`) or `drain` (service/routing.py says which). The balancer's `agent-check` polls it, so creates
go to the node with the most room and none to one being upgraded or full.

It runs in the pool keeper (the one long-lived process with a manager) when service.agent_check_port is set. The
reply carries nothing but that line; a client sends nothing (anything it sends is ignored, never read).
"""

from __future__ import annotations

import contextlib
import logging
import socketserver
import threading
from collections.abc import Callable
from pathlib import Path

from .routing import Capacity, agent_reply

log = logging.getLogger("appliance.agent_check")
DRAIN_FILE = "draining"  # in the state directory: while it exists the node takes no new creates (upgrade.yml)


class AgentCheckServer:
    def __init__(self, address: str, port: int, capacity: Callable[[], Capacity],
                 draining: Callable[[], bool]) -> None:
        self._capacity, self._draining = capacity, draining
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                self.request.settimeout(5)
                with contextlib.suppress(OSError):  # the checker went away: nothing to tell
                    self.request.sendall(outer.reply().encode())

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self._server = socketserver.ThreadingTCPServer((address, port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="agent-check", daemon=True)

    def reply(self) -> str:
        try:
            return agent_reply(self._capacity(), self._draining())
        except Exception as exc:  # an unknown state takes no creates, but stays up for its sandboxes
            log.warning("agent check: capacity unknown (%s); answering drain", exc)
            return "drain\n"

    def start(self) -> AgentCheckServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


def drain_flag(state_dir: Path) -> Callable[[], bool]:
    return lambda: (state_dir / DRAIN_FILE).exists()
