"""A minimal single-threaded event loop: readiness callbacks on file descriptors plus named one-shot timers.

select.poll directly (no selectors layer: every Python frame on the per-exec path costs under TCG). poll
rather than epoll: it accepts any descriptor (a regular file as stdin in a test, a virtio-serial port in the
guest) and changing the interest set costs no system call.
"""

from __future__ import annotations

import math
import select
import time
from collections.abc import Callable, Hashable

from appliance_agent.sysops import format_exc, log

Callback = Callable[[], None]
# poll() takes milliseconds in a C int: wait in slices of at most this long.
MAX_WAIT_MS = 3_600_000
READ_EVENTS = select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR | select.POLLNVAL
WRITE_EVENTS = select.POLLOUT | select.POLLHUP | select.POLLERR | select.POLLNVAL


class Loop:
    def __init__(self) -> None:
        self._poll = select.poll()
        self._handlers: dict[int, list[Callback | None]] = {}
        self._masks: dict[int, int] = {}
        self._timers: dict[Hashable, tuple[float, Callback]] = {}
        self._batch: list[tuple[int, int]] = []
        self.stopped = False

    # -- descriptors -------------------------------------------------------------------------------------

    def set_reader(self, fd: int, callback: Callback | None) -> None:
        self._handlers.setdefault(fd, [None, None])[0] = callback
        self._update(fd)

    def set_writer(self, fd: int, callback: Callback | None) -> None:
        self._handlers.setdefault(fd, [None, None])[1] = callback
        self._update(fd)

    def forget(self, fd: int) -> None:
        """Stop watching fd entirely (call before closing it)."""
        self._handlers.pop(fd, None)
        self._update(fd)

    def _update(self, fd: int) -> None:
        reader, writer = self._handlers.get(fd, (None, None))
        mask = (select.POLLIN if reader else 0) | (select.POLLOUT if writer else 0)
        old = self._masks.get(fd, 0)
        if mask == old:
            return
        if not mask:
            self._handlers.pop(fd, None)
            del self._masks[fd]
            self._poll.unregister(fd)
            return
        self._masks[fd] = mask
        if old:
            self._poll.modify(fd, mask)
        else:
            self._poll.register(fd, mask)

    def reported_readable(self, fd: int) -> bool:
        """Whether the poll whose results are being handled now said fd was readable.

        A pipe that was not readable then held nothing written before anything that was: the agent skips
        draining such a pipe (a system call) when a control message arrives.
        """
        for ready_fd, events in self._batch:
            if ready_fd == fd:
                return bool(events & READ_EVENTS)
        return False

    def only_ready(self, fd: int) -> bool:
        """Whether fd is the only descriptor the poll whose results are being handled now reported."""
        batch = self._batch
        return len(batch) == 1 and batch[0][0] == fd

    # -- timers --------------------------------------------------------------------------------------------

    def call_later(self, key: Hashable, delay: float, callback: Callback) -> None:
        """Run callback once after delay seconds; a timer with the same key is replaced."""
        self._timers[key] = (time.monotonic() + delay, callback)

    def cancel(self, key: Hashable) -> None:
        self._timers.pop(key, None)

    def has_timer(self, key: Hashable) -> bool:
        return key in self._timers

    # -- running -------------------------------------------------------------------------------------------

    def run(self) -> None:
        while not self.stopped:
            self.run_once()

    def run_once(self) -> None:
        timeout_ms = None
        if self._timers:
            next_deadline = min(deadline for deadline, _ in self._timers.values())
            timeout_ms = min(MAX_WAIT_MS, max(0, math.ceil((next_deadline - time.monotonic()) * 1000)))
        self._batch = batch = self._poll.poll(timeout_ms)
        handlers = self._handlers
        for fd, events in batch:
            # Handlers may change during this batch (a worker replaced, a pipe closed): look them up again,
            # and every handler tolerates a spurious wake-up (its read sees EAGAIN).
            if events & READ_EVENTS:
                callback = handlers.get(fd, (None, None))[0]
                if callback is not None:
                    self._call(callback)
            if events & WRITE_EVENTS:
                callback = handlers.get(fd, (None, None))[1]
                if callback is not None:
                    self._call(callback)
        self._batch = []
        if self._timers:
            now = time.monotonic()
            for timer_key, (deadline, callback) in list(self._timers.items()):
                if deadline <= now and self._timers.get(timer_key) == (deadline, callback):
                    del self._timers[timer_key]
                    self._call(callback)

    @staticmethod
    def _call(callback: Callback) -> None:
        try:
            callback()
        except Exception:
            # The agent is PID 1 in the guest: a bug in one handler must not take the VM down.
            log("internal error in event handler:\n" + format_exc())
