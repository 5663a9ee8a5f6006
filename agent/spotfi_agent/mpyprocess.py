"""Run commands on MicroPython's unix port, which has no subprocess module.

procrun.run() hands commands to run() here when subprocess is missing. The
unix port's os module offers system() but no fork, exec, pipe or waitpid,
and system() runs its command through /bin/sh -c, which the agent never does
with arguments taken from a request. Starting a process from an argument
vector therefore needs the `ffi` module, to call libc directly, and this
module does not call it yet. Every command finishes at once with `error`
set to the reason from unavailable_reason(), so RPC callers get a clear
"failed" result and metrics come from /proc alone.
"""

from spotfi_agent.procrun import CommandResult

try:
    import ffi
except ImportError:
    ffi = None

NO_FFI_REASON = ("this MicroPython build has no ffi module, so the agent cannot start processes"
                 " (ubus, operator handlers, the terminal shell); install a micropython build"
                 " that includes ffi, or run the agent on CPython")


def unavailable_reason():
    """Return why commands cannot start on this runtime, or None when they can."""
    if ffi is None:
        return NO_FFI_REASON
    # NOTE: fork, pipe, execvp and waitpid through ffi are not written yet,
    # because no MicroPython build with ffi was at hand to test them.
    return ("this agent cannot start processes through MicroPython's ffi module yet; run it on"
            " CPython to use ubus, operator handlers and the terminal")


def pty_unavailable_reason():
    """Return why terminal sessions cannot start on this runtime."""
    if ffi is None:
        return "this MicroPython build has no ffi module to open a PTY with"
    # NOTE: opening a PTY through ffi needs the architecture's ioctl numbers
    # (TIOCSCTTY, TIOCSWINSZ differ on MIPS), so it is not implemented yet.
    return "the agent opens PTYs only on CPython (ptyprocess), not yet through MicroPython's ffi"


class UnstartedCommand:
    """A command that could not start; its callback gets the reason on the next loop turn."""

    pid = None

    def __init__(self, loop, reason, callback):
        self.result = CommandResult()
        self.result.error = reason
        self._callback = callback
        loop.call_soon(self._finish)

    def _finish(self):
        self._callback(self.result)

    def kill(self):
        pass


def run(loop, argv, timeout, callback, output_cap, env=None):
    """Start `argv` like procrun.run(); call callback(CommandResult) on the loop when it ends."""
    return UnstartedCommand(loop, unavailable_reason(), callback)
