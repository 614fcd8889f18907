"""What one exec may make the host hold: a byte budget over everything it returns (stdout, stderr, displays, the
value) and a budget of events. The guest is hostile by assumption: its agent caps stdout and stderr itself, but
nothing the guest sends is believed, so the host counts again, on every event, before it keeps or forwards it.
Pure logic; the engine's Sandbox.exec_events applies it to the agent's events.
"""

from __future__ import annotations

import json
from typing import Any

MAX_EVENTS = 100_000  # output arrives in chunks of up to 64 KiB: far more than any honest exec sends
HOST_MARKER = "\n[host: output past this exec's {budget}-byte budget was dropped; truncated_bytes counts it]\n"
_COUNTED = {"stdout", "stderr", "display"}


class ResultBudget:
    def __init__(self, budget_bytes: int, max_events: int = MAX_EVENTS) -> None:
        self.budget = budget_bytes
        self.max_events = max_events
        self.used = 0
        self.events = 0
        self.dropped = 0
        self._announced = False

    def admit(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        """What of `event` to keep and pass on: the event, nothing (it is over budget), or the marker that says
        output was dropped. The final event (done) always passes, carrying the dropped bytes."""
        kind = event.get("ev")
        self.events += 1
        if kind == "done":
            return [self._final(event)]
        if kind not in _COUNTED:
            return [event]
        size = _size(event.get("data"))
        if self.used + size <= self.budget and self.events <= self.max_events:
            self.used += size
            return [event]
        self.dropped += size
        if self._announced:
            return []
        self._announced = True
        return [{**event, "ev": "stderr", "data": HOST_MARKER.format(budget=self.budget)}]

    def _final(self, event: dict[str, Any]) -> dict[str, Any]:
        done = dict(event)
        value_size = _size(done.get("value"))
        if value_size and self.used + value_size > self.budget:
            self.dropped += value_size
            done["value"] = {"text/plain": f"[host: the value ({value_size} bytes) went over the exec's budget]"}
        if self.dropped:
            reported = done.get("truncated_bytes")
            done["truncated_bytes"] = (reported if isinstance(reported, int) and reported >= 0 else 0) + self.dropped
        return done


def _size(data: Any) -> int:
    """Bytes a piece of an event costs to hold and to send on (strings by their UTF-8, bundles as JSON)."""
    if data is None:
        return 0
    if isinstance(data, str):
        return len(data.encode("utf-8", errors="replace"))
    try:
        return len(json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8", errors="replace"))
    except (TypeError, ValueError, RecursionError):
        return 1 << 62  # nothing a well-formed agent sends: over any budget
