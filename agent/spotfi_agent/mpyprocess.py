"""Run commands on MicroPython's unix port, which has no subprocess module.

procrun.run() hands commands to run() here when os.posix_spawnp is missing.
The unix port's os module offers system() but no fork, exec, pipe or
waitpid, and system() waits for its command. So each command starts as a
background job of /bin/sh: system() returns once the shell has put the job
in the background, the job writes its output and exit status to files under
$TMPDIR (/tmp by default), and a loop timer polls for the status file. The
command's arguments reach the job single-quoted, as positional parameters
that it runs as "$@", so no part of a request is ever read as shell syntax.
"""

import binascii
import os
import time

from spotfi_agent.compat import is_file
from spotfi_agent.procrun import CommandResult

DEFAULT_TEMP_DIR = "/tmp"


def temp_dir():
    """Return the folder for job files: $TMPDIR, else /tmp."""
    return os.getenv("TMPDIR") or DEFAULT_TEMP_DIR

# The job runs the command with its output in files, then writes its exit
# status to a file of its own, renamed into place so that it is complete
# when the agent reads it. `$!` is the command's pid, kept for a timeout kill.
JOB_SCRIPT = ('p=$1; shift; "$@" </dev/null >"$p.out" 2>"$p.err" & echo $! >"$p.pid"; '
              'wait $!; echo $? >"$p.tmp"; mv "$p.tmp" "$p.status"')

FIRST_POLL = 0.002
MAX_POLL = 0.1
# How long a killed job may take to write its status before its files are
# removed anyway.
KILL_WAIT = 5.0

# Job files older than this (seconds) are left from an agent that stopped
# while the job ran, because no job outlives its timeout by that much.
STALE_AFTER = 3600

# sh reports a command killed by signal N as exit status 128 + N.
SIGNAL_STATUS_BASE = 128
# sh's exit status for a command it cannot find.
NOT_FOUND_STATUS = 127


def unavailable_reason():
    """Return why commands cannot start on this runtime, or None when they can."""
    if not hasattr(os, "system"):
        return ("this MicroPython build has no os.system, so the agent cannot start processes"
                " (ubus, operator handlers); run the agent on CPython")
    return None


def pty_unavailable_reason():
    """Return why terminal sessions cannot start on this runtime."""
    try:
        import ffi  # noqa: F401
    except ImportError:
        return "this MicroPython build has no ffi module to open a PTY with"
    # NOTE: opening a PTY through ffi needs the architecture's ioctl numbers
    # (TIOCSCTTY, TIOCSWINSZ differ on MIPS). It is not written, because no
    # MicroPython build with ffi was available to test it against.
    return "the agent opens PTYs only on CPython (ptyprocess), not yet through MicroPython's ffi"


def shell_quote(text):
    """Return text as one single-quoted sh word."""
    return "'" + text.replace("'", "'\\''") + "'"


def _read_head(path, size):
    """Return (up to `size` bytes from the start of path, its whole length); (b"", 0) when missing."""
    try:
        length = os.stat(path)[6]
    except OSError:
        return b"", 0
    # MicroPython's read(n) allocates n bytes first, so never ask for more
    # than the file holds.
    with open(path, "rb") as handle:
        return handle.read(min(length, size)), length


class ShellJob:
    """One command run as a background job of /bin/sh, polled on the loop."""

    pid = None

    def __init__(self, loop, argv, timeout, callback, output_cap):
        self.loop = loop
        self.argv = argv
        self.callback = callback
        self.output_cap = output_cap
        self.result = CommandResult()
        self.prefix = "%s/spotfi-agent-job-%s" % (temp_dir(), binascii.hexlify(os.urandom(8)).decode())
        self._finished = False
        self._killed_at = None
        self._kill_sent = False
        self._poll_delay = FIRST_POLL
        self._timer = None
        self._start(timeout)

    def _start(self, timeout):
        words = ["/bin/sh", "-c", shell_quote(JOB_SCRIPT), "spotfi-agent-job", shell_quote(self.prefix)]
        for argument in self.argv:
            words.append(shell_quote(argument))
        status = os.system(" ".join(words) + " >/dev/null 2>&1 &")
        if status != 0:
            self.result.error = "cannot run %s: /bin/sh failed with status %s" % (self.argv[0], status)
            self.loop.call_soon(self._finish)
            return
        self._timer = self.loop.call_later(timeout, self._on_timeout)
        self.loop.call_later(self._poll_delay, self._poll)

    def _poll(self):
        if self._finished:
            return
        if is_file(self.prefix + ".status"):
            try:
                self._collect()
            except (OSError, MemoryError) as error:
                # A large output may not fit in a small MicroPython heap.
                self.result.error = "cannot read the output of %s: %s" % (self.argv[0], error)
                self._finish()
            return
        if self._killed_at is not None:
            if self.loop.time() - self._killed_at > KILL_WAIT:
                self._finish()
                return
            if not self._kill_sent:
                self._send_kill()
        self._poll_delay = min(self._poll_delay * 2, MAX_POLL)
        self.loop.call_later(self._poll_delay, self._poll)

    def _collect(self):
        for name, suffix in (("stdout", ".out"), ("stderr", ".err")):
            data, length = _read_head(self.prefix + suffix, self.output_cap)
            if length > self.output_cap:
                self.result.truncated = True
            setattr(self.result, name, data)
        if not self.result.timed_out:
            self.result.status = self._read_status()
        self._finish()

    def _read_status(self):
        text = _read_head(self.prefix + ".status", 16)[0].strip()
        try:
            status = int(text)
        except ValueError:
            self.result.error = "cannot read the exit status of %s: %r" % (self.argv[0], text)
            return None
        if status == NOT_FOUND_STATUS and b"not found" in self.result.stderr:
            self.result.not_found = True
            self.result.error = "cannot run %s: not found" % self.argv[0]
            return None
        if status > SIGNAL_STATUS_BASE:
            return SIGNAL_STATUS_BASE - status
        return status

    def _on_timeout(self):
        self._timer = None
        if self._finished:
            return
        self.result.timed_out = True
        self.kill()

    def kill(self):
        """SIGKILL the command; its output so far and the timeout flag become the result."""
        if self._finished or self._killed_at is not None:
            return
        self._killed_at = self.loop.time()
        self._send_kill()

    def _send_kill(self):
        # The pid file may not exist yet when the job has only just started;
        # _poll() then tries again.
        try:
            pid = int(_read_head(self.prefix + ".pid", 16)[0].strip())
        except ValueError:
            return
        # NOTE: only the command itself is killed. Processes it started
        # live on, because the shell job cannot give it a process group of
        # its own without setsid, which busybox may lack.
        os.system("kill -9 %d >/dev/null 2>&1" % pid)
        self._kill_sent = True

    def _finish(self):
        if self._finished:
            return
        self._finished = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for suffix in (".out", ".err", ".pid", ".tmp", ".status"):
            try:
                os.remove(self.prefix + suffix)
            except OSError:
                pass
        self.callback(self.result)


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


_stale_checked = [False]


def remove_stale_job_files(now=None):
    """Remove the job files that an earlier agent left in temp_dir(); return how many."""
    if now is None:
        now = time.time()
    removed = 0
    try:
        directory = temp_dir()
        names = os.listdir(directory)
    except OSError:
        return 0
    for name in names:
        if not name.startswith("spotfi-agent-job-"):
            continue
        path = directory + "/" + name
        try:
            if now - os.stat(path)[8] > STALE_AFTER:
                os.remove(path)
                removed += 1
        except OSError:
            pass
    return removed


def run(loop, argv, timeout, callback, output_cap, env=None):
    """Start `argv` like procrun.run(); call callback(CommandResult) on the loop when it ends."""
    if not _stale_checked[0]:
        # /tmp is RAM on a router, so files left by a stopped agent must go.
        _stale_checked[0] = True
        remove_stale_job_files()
    reason = unavailable_reason()
    if reason is not None:
        return UnstartedCommand(loop, reason, callback)
    if env is not None:
        raise ValueError("a separate environment for a command is not supported on MicroPython")
    for argument in argv:
        if "\0" in argument:
            raise ValueError("an argument contains a NUL character: %r" % argument)
    return ShellJob(loop, argv, timeout, callback, output_cap)
