"""Run a command as an argument vector on the loop, with a timeout and an output cap.

Used for ubus calls, operator handlers and metrics collectors. Nothing here
goes through a shell. The child runs in its own process group, so a timeout
kills everything it started.
"""

import os

from spotfi_agent.compat import signal
from spotfi_agent.log import get_logger

log = get_logger(__name__)

# CPython starts commands with os.posix_spawnp: it is a vfork and exec in C,
# and it spares the agent the subprocess module (about 0.9 MB of RSS on
# CPython 3.11, measured with tools/bench.py's method).
_CAN_SPAWN = hasattr(os, "posix_spawnp")

DEFAULT_OUTPUT_CAP = 256 * 1024
READ_SIZE = 65536


class CommandResult:
    """The outcome of one command.

    `status` is the exit status (negative for a signal), or None when the
    command could not start (`error` then gives the reason) or was killed on timeout
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


def spawn(argv, env=None):
    """Start argv in a new session with stdin from /dev/null; return (pid, stdout fd, stderr fd).

    Raises OSError when the program cannot be found or started.
    """
    out_read, out_write = os.pipe()
    err_read, err_write = os.pipe()
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
        (os.POSIX_SPAWN_DUP2, out_write, 1),
        (os.POSIX_SPAWN_DUP2, err_write, 2),
    ]
    # CPython ignores SIGPIPE and SIGXFSZ; a child must start with the defaults.
    defaults = [getattr(signal, name) for name in ("SIGPIPE", "SIGXFSZ") if hasattr(signal, name)]
    try:
        pid = os.posix_spawnp(argv[0], argv, os.environ if env is None else env,
                              file_actions=actions, setsid=True, setsigdef=defaults)
    except BaseException:
        os.close(out_read)
        os.close(err_read)
        raise
    finally:
        os.close(out_write)
        os.close(err_write)
    return pid, out_read, err_read


def exit_status(pid):
    """Reap pid if it has exited; return its status (negative for a signal) or None."""
    try:
        reaped, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return -1
    if reaped == 0:
        return None
    return os.waitstatus_to_exitcode(status)


class RunningCommand:
    """A child process whose pipes are read on the loop."""

    def __init__(self, loop, argv, timeout, callback, output_cap=DEFAULT_OUTPUT_CAP, env=None):
        self.loop = loop
        self.argv = argv
        self.callback = callback
        self.output_cap = output_cap
        self.result = CommandResult()
        self._buffers = {}
        self._pid = None
        self._pidfd = None
        self._status = None
        self._finished = False
        self._reap_delay = 0.0005
        self._timer = None
        self._start(timeout, env)

    def _start(self, timeout, env):
        try:
            self._pid, out_fd, err_fd = spawn(self.argv, env)
        except OSError as error:
            self.result.not_found = isinstance(error, FileNotFoundError)
            self.result.error = "cannot run %s: %s" % (self.argv[0], error.strerror or error)
            self.loop.call_soon(self._finish)
            return
        for fd, name in ((out_fd, "stdout"), (err_fd, "stderr")):
            os.set_blocking(fd, False)
            self._buffers[fd] = (name, bytearray())
            self.loop.add_reader(fd, self._make_reader(fd))
        self._watch_exit()
        self._timer = self.loop.call_later(timeout, self._on_timeout)

    def _watch_exit(self):
        # A pidfd (Linux 5.3 and later) turns readable when the child exits, so
        # the loop learns of the exit at once instead of polling for it.
        try:
            self._pidfd = os.pidfd_open(self._pid)
        except (AttributeError, OSError):
            self._pidfd = None
            self.loop.call_later(self._reap_delay, self._poll_exit)
            return
        self.loop.add_reader(self._pidfd, self._on_exit)

    def _on_exit(self):
        self._status = exit_status(self._pid)
        if self._status is None:
            return
        self.loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = None
        self._check_done()

    def _poll_exit(self):
        if self._finished:
            return
        self._status = exit_status(self._pid)
        if self._status is None:
            self._reap_delay = min(self._reap_delay * 2, 0.1)
            self.loop.call_later(self._reap_delay, self._poll_exit)
            return
        self._check_done()

    @property
    def pid(self):
        return self._pid

    def _make_reader(self, fd):
        return lambda: self._read(fd)

    def _read(self, fd):
        name, buffer = self._buffers[fd]
        try:
            data = os.read(fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close_pipe(fd)
            self._check_done()
            return
        room = self.output_cap - len(buffer)
        if len(data) > room:
            self.result.truncated = True
            data = data[:max(0, room)]
        buffer += data

    def _close_pipe(self, fd):
        name, buffer = self._buffers.pop(fd)
        setattr(self.result, name, bytes(buffer))
        self.loop.remove_reader(fd)
        os.close(fd)

    def _check_done(self):
        if self._buffers or self._status is None:
            return
        if not self.result.timed_out:
            self.result.status = self._status
        self._finish()

    def _on_timeout(self):
        if self._finished:
            return
        self.result.timed_out = True
        self.kill()
        # A grandchild may keep the pipes open, so the output read so far is the result.
        for fd in list(self._buffers):
            self._close_pipe(fd)
        self._check_done()

    def kill(self):
        """SIGKILL the command's whole process group."""
        if self._pid is None or self._status is not None:
            return
        try:
            os.killpg(self._pid, signal.SIGKILL)
        except OSError:
            pass

    def _finish(self):
        if self._finished:
            return
        self._finished = True
        if self._timer is not None:
            self._timer.cancel()
        if self._pidfd is not None:
            self.loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        for fd in list(self._buffers):
            self._close_pipe(fd)
        self.callback(self.result)


def run_capture(argv, timeout):
    """Run argv to its end, blocking; return (exit status, stdout bytes).

    For start-up work such as `uci show`, before the loop runs. Raises OSError
    when the command cannot start or runs past `timeout` seconds (it is then
    killed).
    """
    from spotfi_agent.compat import monotonic
    import select

    pid, out_fd, err_fd = spawn(argv)
    output = bytearray()
    poller = select.poll()
    poller.register(out_fd, select.POLLIN)
    poller.register(err_fd, select.POLLIN)
    open_fds = {out_fd, err_fd}
    deadline = monotonic() + timeout
    try:
        while open_fds:
            remaining = deadline - monotonic()
            if remaining <= 0:
                os.killpg(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise OSError("%s timed out after %s s" % (argv[0], timeout))
            for fd, event in poller.poll(int(remaining * 1000) + 1):
                data = os.read(fd, READ_SIZE)
                if not data:
                    poller.unregister(fd)
                    open_fds.discard(fd)
                elif fd == out_fd:
                    output += data
    finally:
        os.close(out_fd)
        os.close(err_fd)
    status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    return status, bytes(output)


def unavailable_reason():
    """Return why this runtime cannot start commands, or None when it can."""
    if _CAN_SPAWN:
        return None
    from spotfi_agent import mpyprocess
    return mpyprocess.unavailable_reason()


def run(loop, argv, timeout, callback, output_cap=DEFAULT_OUTPUT_CAP, env=None):
    """Start `argv`; call callback(CommandResult) on the loop when it ends."""
    if not _CAN_SPAWN:
        from spotfi_agent import mpyprocess
        return mpyprocess.run(loop, argv, timeout, callback, output_cap, env)
    return RunningCommand(loop, argv, timeout, callback, output_cap, env)
