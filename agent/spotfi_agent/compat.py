"""Differences between CPython and MicroPython, kept in one place.

The agent's core imports from here instead of testing the runtime itself.
"""

import sys
import time

MICROPYTHON = sys.implementation.name == "micropython"

try:
    monotonic = time.monotonic
except AttributeError:  # MicroPython: ticks wrap, so fold them into a growing total.
    _ticks_last = [time.ticks_ms(), 0]

    def monotonic():
        now = time.ticks_ms()
        _ticks_last[1] += time.ticks_diff(now, _ticks_last[0])
        _ticks_last[0] = now
        return _ticks_last[1] / 1000.0

try:
    # CPython's C module without signal.py's enums, which cost about 0.8 MB of
    # RSS with enum itself; it has every function and number the agent uses.
    import _signal as signal
except ImportError:
    try:
        import signal
    except ImportError:  # MicroPython's unix port
        signal = None


class GetenvMapping:
    """The process environment read through os.getenv, with overrides set by item.

    MicroPython has no os.environ; os.getenv reads one variable at a time, so
    this mapping offers only get() and item assignment, which the settings
    loader needs.
    """

    def __init__(self):
        self._overrides = {}

    def get(self, name, default=None):
        if name in self._overrides:
            return self._overrides[name]
        import os
        value = os.getenv(name)
        return default if value is None else value

    def __setitem__(self, name, value):
        self._overrides[name] = value


def process_environment():
    """Return a mutable copy of the environment: a dict, or a GetenvMapping on MicroPython."""
    import os
    environ = getattr(os, "environ", None)
    if environ is not None:
        return dict(environ)
    return GetenvMapping()


def path_join(*parts):
    """Join path parts with "/" (MicroPython has no os.path)."""
    result = ""
    for part in parts:
        if not part:
            continue
        if part.startswith("/") or not result:
            result = part
        elif result.endswith("/"):
            result = result + part
        else:
            result = result + "/" + part
    return result


READ_CHUNK_SIZE = 16384


def read_bytes(path, limit=1048576):
    """Return up to `limit` bytes of a file, or None when it does not exist or cannot be read."""
    chunks = []
    size = 0
    try:
        with open(path, "rb") as handle:
            # Small reads, because MicroPython allocates the whole size asked
            # for, however short the file: 1 MB of its 2 MB default heap.
            while size < limit:
                chunk = handle.read(min(READ_CHUNK_SIZE, limit - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
    except OSError:
        return None
    return b"".join(chunks)


def read_text(path, limit=1048576):
    """Return the text of a file, or None when it does not exist or cannot be read."""
    data = read_bytes(path, limit)
    if data is None:
        return None
    return data.decode("utf-8", "replace")


def is_file(path):
    import os
    try:
        mode = os.stat(path)[0]
    except OSError:
        return False
    return mode & 0o170000 == 0o100000


DEFAULT_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def is_executable(path):
    """Return True for a regular file with an execute bit set."""
    import os
    try:
        mode = os.stat(path)[0]
    except OSError:
        return False
    return mode & 0o170000 == 0o100000 and mode & 0o111 != 0


def find_executable(command):
    """Return the path of `command` (a name looked up on PATH, or a path), or None."""
    import os
    if "/" in command:
        return command if is_executable(command) else None
    for directory in (os.getenv("PATH") or DEFAULT_PATH).split(":"):
        # An empty PATH entry means the working directory, which is never
        # where the agent should find a command.
        if not directory:
            continue
        candidate = path_join(directory, command)
        if is_executable(candidate):
            return candidate
    return None
