"""A single-threaded event loop over select.poll, with timers.

The agent runs everything (MQTT socket, RPC child processes, PTYs, timers) on
this loop, without threads: it keeps the agent small and behaves the same on
CPython and MicroPython, which both have select.poll. Callbacks must not block.
"""

import heapq
import select

from spotfi_agent.compat import monotonic
from spotfi_agent.log import get_logger

log = get_logger(__name__)

POLLIN = select.POLLIN
POLLOUT = select.POLLOUT
# POLLHUP and POLLERR are reported without being asked for; a reader sees them
# as readable, so its next read returns EOF or the error.
_READ_EVENTS = POLLIN | getattr(select, "POLLHUP", 16) | getattr(select, "POLLERR", 8)


class Timer:
    """A callback scheduled by Loop.call_later; cancel() stops it."""

    def __init__(self, when, callback, args):
        self.when = when
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self):
        self.cancelled = True
        # A cancelled timer stays in the loop's heap until it is due, which
        # for an RPC timeout is half a minute later. Dropping the callback
        # now frees what it refers to, such as a finished command and its
        # output. Hundreds of those ran a small MicroPython heap out of memory.
        self.callback = None
        self.args = ()


class Loop:
    """Poll-based loop: file descriptor callbacks, timers and deferred calls."""

    def __init__(self):
        self._poller = select.poll()
        self._readers = {}
        self._writers = {}
        self._timers = []
        self._timer_sequence = 0
        self._ready = []
        self._running = False

    def time(self):
        return monotonic()

    def call_later(self, delay, callback, *args):
        timer = Timer(monotonic() + max(0.0, delay), callback, args)
        self._timer_sequence += 1
        heapq.heappush(self._timers, (timer.when, self._timer_sequence, timer))
        return timer

    def call_soon(self, callback, *args):
        self._ready.append((callback, args))

    def add_reader(self, fd, callback):
        self._readers[fd] = callback
        self._update(fd)

    def remove_reader(self, fd):
        if self._readers.pop(fd, None) is not None:
            self._update(fd)

    def add_writer(self, fd, callback):
        self._writers[fd] = callback
        self._update(fd)

    def remove_writer(self, fd):
        if self._writers.pop(fd, None) is not None:
            self._update(fd)

    def _update(self, fd):
        mask = 0
        if fd in self._readers:
            mask |= POLLIN
        if fd in self._writers:
            mask |= POLLOUT
        try:
            self._poller.unregister(fd)
        except (KeyError, OSError, ValueError):
            pass
        if mask:
            self._poller.register(fd, mask)

    def stop(self):
        self._running = False

    @property
    def running(self):
        return self._running

    def run(self):
        """Run callbacks until stop() is called."""
        self._running = True
        while self._running:
            self.run_once()

    def run_once(self, max_wait=None):
        """Wait for one batch of events or timers and run their callbacks."""
        self._run_ready()
        timeout = self._next_timeout(max_wait)
        try:
            events = self._poller.poll(timeout)
        except OSError as error:
            # EINTR from a signal: the signal handler has already run.
            if getattr(error, "errno", None) != 4:
                raise
            events = []
        for fd, mask in events:
            if not isinstance(fd, int):
                fd = fd.fileno()
            if mask & POLLOUT and fd in self._writers:
                self._call(self._writers[fd])
            if mask & _READ_EVENTS and fd in self._readers:
                self._call(self._readers[fd])
        self._run_timers()
        self._run_ready()

    def _next_timeout(self, max_wait):
        if self._ready:
            return 0
        wait = 3600.0 if max_wait is None else max_wait
        while self._timers and self._timers[0][2].cancelled:
            heapq.heappop(self._timers)
        if self._timers:
            wait = min(wait, self._timers[0][0] - monotonic())
        # Round up, so a timer due in 0.4 ms is not polled for again and again.
        return max(0, int(wait * 1000 + 0.999))

    def _run_timers(self):
        now = monotonic()
        while self._timers and self._timers[0][0] <= now:
            timer = heapq.heappop(self._timers)[2]
            if not timer.cancelled:
                timer.cancelled = True
                self._call(timer.callback, timer.args)

    def _run_ready(self):
        ready = self._ready
        self._ready = []
        for callback, args in ready:
            self._call(callback, args)

    def _call(self, callback, args=()):
        try:
            callback(*args)
        except Exception:
            # One faulty callback must not stop the router's only connection.
            log.exception("callback %r failed", callback)
