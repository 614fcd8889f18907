"""The watch stream: polls a guest watch (appliance_agent/filewatch.py) and turns its replies into events.

The guest keeps events between polls (bounded, with an overflow flag), so a poll that waits behind an exec of this
process loses nothing. The stream ends when its time is up, when the watched directory goes, when the sandbox
stops, or when the client disconnects: a quiet stream sends a `ping` every PING_S, and a write to a closed
connection ends the iterator (its `finally` stops the guest watch).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

from .errors import Busy, ServiceError
from .file_entries import watch_event

POLL_S = 0.25  # between polls when the guest had nothing more: a poll is one short round trip
PING_S = 5.0
MAX_REPLY_EVENTS = 500  # the guest's own bound (filewatch.MAX_REPLY); more from it are dropped
DEFAULT_DURATION_S, MAX_DURATION_S = 60.0, 3600.0

Call = Callable[..., dict[str, Any]]  # call(op, **args) -> the guest's reply, or a ServiceError


def stream(call: Call, watch: str, duration_s: float, clock: Callable[[], float] = time.monotonic,
           sleep: Callable[[float], None] = time.sleep) -> Iterator[dict[str, Any]]:
    """Events {type: create|modify|delete, path, is_dir}, {type: overflow} when the guest dropped some,
    {type: ping} while quiet, and last {type: end, reason: timeout|deleted|sandbox_lost|error}."""
    deadline = clock() + duration_s
    quiet_since = clock()
    reason = "timeout"
    try:
        while clock() < deadline:
            try:
                reply = call("watch_poll", watch=watch)
            except Busy:  # this process's connection is taken by an exec: the guest keeps the events meanwhile
                reply = {}
            except ServiceError as exc:
                reason = "sandbox_lost" if exc.code == "sandbox_lost" else "error"
                break
            raw = reply.get("events")
            events = [event for event in map(watch_event, raw[:MAX_REPLY_EVENTS] if isinstance(raw, list) else [])
                      if event is not None]
            if reply.get("overflow") is True:
                yield {"type": "overflow"}
            yield from events
            if events:
                quiet_since = clock()
            elif clock() - quiet_since >= PING_S:
                yield {"type": "ping"}
                quiet_since = clock()
            if reply.get("ended") is True:
                reason = "deleted"
                break
            if reply.get("more") is not True:
                sleep(min(POLL_S, max(0.0, deadline - clock())))
        yield {"type": "end", "reason": reason}
    finally:
        if reason not in {"deleted", "sandbox_lost"}:
            with contextlib.suppress(Exception):
                call("watch_stop", watch=watch)
