"""Rate limit for warnings that a misbehaving router can repeat every few seconds."""

import time

REPORT_INTERVAL = 300.0
MAX_KEYS = 10000


class RepeatLimiter:
    """Decide whether a repeated warning is logged: the first time, then once per interval.

    `check(key)` returns None when the warning is to be dropped, otherwise the
    number of occurrences dropped since it was last logged, for the message.
    """

    def __init__(self, interval=REPORT_INTERVAL, clock=time.monotonic):
        self.interval = interval
        self._clock = clock
        self._state = {}  # key -> [time last logged, occurrences dropped since]

    def check(self, key):
        now = self._clock()
        state = self._state.get(key)
        if state is not None and now - state[0] < self.interval:
            state[1] += 1
            return None
        if state is None and len(self._state) >= MAX_KEYS:
            # Many distinct keys (for example topics of many bad routers): forget
            # them all rather than grow without bound.
            self._state.clear()
        dropped = state[1] if state is not None else 0
        self._state[key] = [now, 0]
        return dropped


def repeat_suffix(dropped):
    """Return the text appended to a warning after `dropped` repeats were left out."""
    if not dropped:
        return ""
    return " (%d more like this since the last report)" % dropped
