"""How long the pool keeper has itself seen a value stay the same, on its own monotonic clock.

The registry's times (last use, reservation) are wall-clock stamps, written by many processes. A wall clock can
jump (an NTP step, a VM host resumed, an operator's `date -s`): judged by the wall clock alone, a jump forward makes
every sandbox look idle and every create in flight look abandoned at once. The keeper therefore also asks how long
it has watched a stamp unchanged, which no jump of the wall clock can shorten; it acts only when both say so.
After the keeper (re)starts, each stamp is watched from then on: an idle sandbox lives up to one lifetime longer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterable


class Ages:
    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.monotonic = monotonic
        self._seen: dict[Hashable, tuple[object, float]] = {}

    def unchanged_for(self, key: Hashable, value: object) -> float:
        """Seconds this keeper has seen `key` hold `value` (0 the first time, or when the value changed)."""
        now = self.monotonic()
        seen = self._seen.get(key)
        if seen is None or seen[0] != value:
            self._seen[key] = (value, now)
            return 0.0
        return now - seen[1]

    def keep_only(self, keys: Iterable[Hashable]) -> None:
        """Forget every key but `keys` (records that are gone)."""
        wanted = set(keys)
        self._seen = {key: seen for key, seen in self._seen.items() if key in wanted}
