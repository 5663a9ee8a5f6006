"""Logging to stderr.

procd passes the agent's stderr to logd, so `logread -e spotfi` shows these
lines. The agent writes them with a small logger of its own, because
importing `logging` costs about 0.65 MB of RSS on CPython 3.11 (with
traceback, threading and re). MicroPython has no `logging` at all. When the process has already imported `logging` (a test
run, or a program embedding the agent), the standard loggers are used, so
their handlers and pytest's caplog see the agent's lines.
"""

import sys

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}

_logging = sys.modules.get("logging")


class _StderrLogger:
    """The subset of logging.Logger the agent uses, writing "LEVEL name: message" lines."""

    threshold = [20]

    def __init__(self, name):
        self.name = name

    def _emit(self, level, label, message, args):
        if level < self.threshold[0]:
            return
        if args:
            try:
                message = message % args
            except (TypeError, ValueError):
                message = "%s %r" % (message, args)
        sys.stderr.write("%s %s: %s\n" % (label, self.name, message))

    def debug(self, message, *args):
        self._emit(10, "DEBUG", message, args)

    def info(self, message, *args):
        self._emit(20, "INFO", message, args)

    def warning(self, message, *args):
        self._emit(30, "WARNING", message, args)

    def error(self, message, *args):
        self._emit(40, "ERROR", message, args)

    def exception(self, message, *args):
        # MicroPython clears sys.exc_info() when any later try block ends,
        # including the one in _emit, so the error is taken first.
        error = sys.exc_info()[1] if hasattr(sys, "exc_info") else None
        self._emit(40, "ERROR", message, args)
        if error is None:
            return
        if hasattr(sys, "print_exception"):
            sys.print_exception(error, sys.stderr)
        else:
            import traceback
            traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)

    def isEnabledFor(self, level):
        return level >= self.threshold[0]


def get_logger(name):
    if _logging is not None:
        return _logging.getLogger(name)
    return _StderrLogger(name)


def configure(level_name):
    """Send log lines to stderr at `level_name` (debug, info, warning or error)."""
    level = LEVELS.get(level_name, 20)
    if _logging is None:
        _StderrLogger.threshold[0] = level
        return
    handler = _logging.StreamHandler(sys.stderr)
    # procd and logd add their own timestamps, so the line starts with the level.
    handler.setFormatter(_logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = _logging.getLogger("spotfi_agent")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
