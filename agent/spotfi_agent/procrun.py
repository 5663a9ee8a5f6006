"""Run a command as an argument vector on the loop, with a timeout and an output cap.

Used for ubus calls, operator handlers and metrics collectors. Nothing here
goes through a shell. The child runs in its own process group, so a timeout
kills everything it started.
"""

import os

try:
    import signal
except ImportError:  # MicroPython's unix port has no signal module.
    signal = None

from spotfi_agent.log import get_logger

log = get_logger(__name__)

try:
    import subprocess
except ImportError:  # MicroPython: run() hands commands to spotfi_agent.mpyprocess.
    subprocess = None

DEFAULT_OUTPUT_CAP = 256 * 1024
READ_SIZE = 65536


class CommandResult:
    """The outcome of one command.

    `status` is the exit status (negative for a signal), or None when the
    command could not start (`error` then says why) or was killed on timeout
    (`timed_out` is then True).
    """

    def __init__(self):
        self.status = None
        self.stdout = b""
        self.stderr = b""
        self.truncated = False
        self.timed_out = False
        self.error = None
        self.not_found = False


class RunningCommand:
    """A child process whose pipes are read on the loop."""

    def __init__(self, loop, argv, timeout, callback, output_cap=DEFAULT_OUTPUT_CAP, env=None):
        self.loop = loop
        self.argv = argv
        self.callback = callback
        self.output_cap = output_cap
        self.result = CommandResult()
        self._buffers = {}
        self._open_fds = 0
        self._process = None
        self._finished = False
        self._reap_delay = 0.001
        self._timer = None
        self._start(timeout, env)

    def _start(self, timeout, env):
        if subprocess is None:
            self.result.error = "this runtime cannot start processes"
            self.loop.call_soon(self._finish)
            return
        try:
            self._process = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, close_fds=True, start_new_session=True, env=env)
        except OSError as error:
            self.result.not_found = isinstance(error, FileNotFoundError)
            self.result.error = "cannot run %s: %s" % (self.argv[0], error.strerror or error)
            self.loop.call_soon(self._finish)
            return
        for stream, name in ((self._process.stdout, "stdout"), (self._process.stderr, "stderr")):
            fd = stream.fileno()
            os.set_blocking(fd, False)
            self._buffers[fd] = (name, bytearray(), stream)
            self._open_fds += 1
            self.loop.add_reader(fd, self._make_reader(fd))
        self._timer = self.loop.call_later(timeout, self._on_timeout)

    @property
    def pid(self):
        return self._process.pid if self._process is not None else None

    def _make_reader(self, fd):
        return lambda: self._read(fd)

    def _read(self, fd):
        name, buffer, stream = self._buffers[fd]
        try:
            data = os.read(fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.loop.remove_reader(fd)
            stream.close()
            self._open_fds -= 1
            if self._open_fds == 0:
                self._reap()
            return
        room = self.output_cap - len(buffer)
        if len(data) > room:
            self.result.truncated = True
            data = data[:max(0, room)]
        buffer += data

    def _reap(self):
        if self._finished:
            return
        status = self._process.poll()
        if status is None:
            # The pipes closed but the process lives on for a moment: poll it
            # again with a growing delay instead of blocking the loop in wait().
            self.loop.call_later(self._reap_delay, self._reap)
            self._reap_delay = min(self._reap_delay * 2, 0.1)
            return
        self.result.status = status
        self._finish()

    def _on_timeout(self):
        if self._finished:
            return
        self.result.timed_out = True
        self.kill()
        self._close_pipes()
        self._wait_killed()

    def _wait_killed(self):
        if self._process.poll() is None:
            self.loop.call_later(0.01, self._wait_killed)
            return
        self._finish()

    def kill(self):
        """SIGKILL the command's whole process group."""
        if self._process is None or self._process.poll() is not None:
            return
        try:
            os.killpg(self._process.pid, signal.SIGKILL)
        except OSError:
            pass

    def _close_pipes(self):
        for fd, (name, buffer, stream) in list(self._buffers.items()):
            if not stream.closed:
                self.loop.remove_reader(fd)
                stream.close()
        self._open_fds = 0

    def _finish(self):
        if self._finished:
            return
        self._finished = True
        if self._timer is not None:
            self._timer.cancel()
        for name, buffer, stream in self._buffers.values():
            setattr(self.result, name, bytes(buffer))
        self.callback(self.result)


def unavailable_reason():
    """Return why this runtime cannot start commands, or None when it can."""
    if subprocess is not None:
        return None
    from spotfi_agent import mpyprocess
    return mpyprocess.unavailable_reason()


def run(loop, argv, timeout, callback, output_cap=DEFAULT_OUTPUT_CAP, env=None):
    """Start `argv`; call callback(CommandResult) on the loop when it ends."""
    if subprocess is None:
        from spotfi_agent import mpyprocess
        return mpyprocess.run(loop, argv, timeout, callback, output_cap, env)
    return RunningCommand(loop, argv, timeout, callback, output_cap, env)
