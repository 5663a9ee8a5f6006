"""Start a shell in a pseudo-terminal on CPython, through ptyprocess 0.7.0.

Everything the terminal tunnel needs from the runtime lives here: forking the
shell onto a new PTY, non-blocking reads and writes on the master side, the
window size, signals to the shell's session, and reaping. A MicroPython
adapter has to offer the same `spawn()` and `PtyChild` interface.

The shell runs in a session of its own (ptyprocess forks through pty.fork,
which calls setsid and makes the PTY its controlling terminal). Its pid is
therefore also its process group id and session id.
"""

import errno
import fcntl
import os
import signal
import struct
import termios

try:
    import pwd
except ImportError:
    pwd = None

try:
    from ptyprocess import PtyProcess
except ImportError:
    PtyProcess = None

# Signals that must start at their default action in the shell: CPython
# ignores SIGPIPE and SIGXFSZ, and an ignored signal stays ignored across exec.
_RESET_SIGNALS = ("SIGPIPE", "SIGXFSZ", "SIGHUP", "SIGINT", "SIGQUIT", "SIGTERM",
                  "SIGTSTP", "SIGTTIN", "SIGTTOU", "SIGCHLD")

_WAIT_FLAGS = os.WEXITED | os.WNOHANG | os.WNOWAIT if hasattr(os, "waitid") else None


class SpawnError(Exception):
    """Raised when the shell cannot be started; the message gives the reason.

    `bad_program` is True when the program itself is at fault (missing, not
    executable, not a valid executable), so choosing another one helps.
    """

    def __init__(self, message, bad_program=False):
        Exception.__init__(self, message)
        self.bad_program = bad_program


def user_account():
    """Return (name, home directory) of the user the agent runs as."""
    uid = os.getuid()
    if pwd is not None:
        try:
            entry = pwd.getpwuid(uid)
            return entry.pw_name, entry.pw_dir or "/"
        except KeyError:
            pass
    if uid == 0:
        return "root", "/root"
    return str(uid), "/"


def spawn(argv, env, cwd, rows, cols):
    """Start `argv` on a new PTY of `rows` x `cols` and return its PtyChild.

    `cwd` is used when it is a directory, else the shell starts in "/".
    Raises SpawnError when the program is missing or cannot be executed.
    """
    if PtyProcess is None:
        raise SpawnError("cannot start %s: the Python package ptyprocess is not installed "
                         "(install python3-ptyprocess, or set tunnel to 0)" % argv[0])
    if not _is_directory(cwd):
        cwd = "/"

    def prepare_child():
        # Runs in the forked child before exec. ptyprocess sends an exception
        # raised here back to the parent. Its own `cwd` argument calls chdir
        # outside that guard, where an error would leave the child running as
        # a copy of the agent.
        for name in _RESET_SIGNALS:
            number = getattr(signal, name, None)
            if number is not None:
                signal.signal(number, signal.SIG_DFL)
        if hasattr(signal, "pthread_sigmask"):
            signal.pthread_sigmask(signal.SIG_SETMASK, ())
        os.chdir(cwd)

    # NOTE: when exec fails in the child, ptyprocess raises without returning
    # its PtyProcess, whose finalizer then closes the PTY and reaps the child
    # but sleeps 0.1 s in the agent's loop to do so.
    try:
        process = PtyProcess.spawn(list(argv), env=env, dimensions=(rows, cols),
                                   preexec_fn=prepare_child)
    except FileNotFoundError:
        raise SpawnError("cannot start %s: not found or not executable" % argv[0],
                         True) from None
    except OSError as error:
        # Errors from exec in the child arrive with only the message text set.
        number = error.errno
        reason = os.strerror(number) if number else str(error)
        raise SpawnError("cannot start %s: %s" % (argv[0], reason),
                         number in (errno.EACCES, errno.ENOEXEC, errno.ENOENT)) from None
    return PtyChild(process)


class PtyChild:
    """The master side of one PTY and the shell that owns its slave side.

    `pid` is the shell's pid, `fd` the master file descriptor (non-blocking).
    """

    def __init__(self, process):
        self._process = process
        self.pid = process.pid
        self.fd = process.fd
        self.exit_code = None
        self._reaped = False
        self._survivors = []
        os.set_blocking(self.fd, False)

    @property
    def closed(self):
        return self.fd < 0

    def read(self, size):
        """Return up to `size` bytes, None when none are ready, b"" at the end.

        The end is EIO: Linux returns it once every process has closed the
        slave side and the buffered output has been read.
        """
        try:
            return os.read(self.fd, size)
        except BlockingIOError:
            return None
        except OSError as error:
            if error.errno == errno.EIO:
                return b""
            raise

    def write(self, data):
        """Write what the PTY accepts now and return the number of bytes written.

        Raises OSError (EIO) when no process has the slave side open any more.
        """
        try:
            return os.write(self.fd, data)
        except BlockingIOError:
            return 0

    def set_size(self, rows, cols):
        """Set the window size, which makes the kernel send SIGWINCH to the foreground job."""
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def has_exited(self):
        """Return True once the shell has exited, without reaping it.

        Leaving it unreaped keeps its pid, which is also the session id, from
        being reused until hang_up() has signalled the session.
        """
        if self._reaped:
            return True
        if _WAIT_FLAGS is None:
            return self.reap() is not None
        try:
            result = os.waitid(os.P_PID, self.pid, _WAIT_FLAGS)
        except ChildProcessError:
            return True
        return result is not None

    def reap(self):
        """Collect the shell's exit status and return its exit code, or None while it runs.

        A shell killed by signal N gets 128 + N, as shells report it.
        """
        if self._reaped:
            return self.exit_code
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            # Someone else reaped it; its status is lost.
            pid, status = self.pid, None
        if pid == 0:
            return None
        self._reaped = True
        if status is None:
            self.exit_code = -1
        elif os.WIFSIGNALED(status):
            self.exit_code = 128 + os.WTERMSIG(status)
        else:
            self.exit_code = os.WEXITSTATUS(status)
        return self.exit_code

    def hang_up(self):
        """Send SIGHUP and SIGCONT to every process of the shell's session.

        Call it before reap(), so the session id still belongs to this shell.
        SIGCONT wakes stopped jobs, so they receive the SIGHUP.
        """
        members = _session_members(self.pid)
        self._survivors = [member for member in members if member[0] != self.pid]
        if not self._reaped:
            _signal_group(self.pid, signal.SIGHUP)
            _signal_group(self.pid, signal.SIGCONT)
        for pid, start_time in members:
            _signal_process(pid, signal.SIGHUP)
            _signal_process(pid, signal.SIGCONT)

    def kill_remaining(self):
        """SIGKILL every process of the session that is still there."""
        if not self._reaped:
            _signal_group(self.pid, signal.SIGKILL)
        elif not self._survivor_alive():
            # Nothing of the session is left, so its id may name a new
            # session by now: signal nothing.
            return
        for pid, start_time in _session_members(self.pid):
            _signal_process(pid, signal.SIGKILL)

    def _survivor_alive(self):
        for pid, start_time in self._survivors:
            if _start_time(pid) == start_time:
                return True
        return False

    def close(self):
        """Close the master side, which hangs up the slave side."""
        if self.fd < 0:
            return
        # The fd belongs to ptyprocess's file objects: closing through them
        # keeps their finalizers from closing the same number again later,
        # and `closed` stops PtyProcess.__del__ from blocking in terminate().
        self._process.fileobj.close()
        self._process.closed = True
        self._process.fd = -1
        self.fd = -1


def _is_directory(path):
    try:
        return os.stat(path)[0] & 0o170000 == 0o040000
    except OSError:
        return False


def _signal_group(pgid, number):
    try:
        os.killpg(pgid, number)
    except OSError:
        pass


def _signal_process(pid, number):
    try:
        os.kill(pid, number)
    except OSError:
        pass


def _read_stat(pid):
    try:
        with open("/proc/%d/stat" % pid, "rb") as handle:
            text = handle.read()
    except OSError:
        return None
    # The command name in brackets may contain spaces and ")", so fields are
    # counted from the last ")": state, ppid, pgrp, session, ... starttime is
    # field 22 of the whole line.
    fields = text[text.rfind(b")") + 2:].split()
    if len(fields) < 20:
        return None
    return fields


def _start_time(pid):
    fields = _read_stat(pid)
    return None if fields is None else fields[19]


def _session_members(session_id):
    """Return (pid, start time) of each process in the session, from /proc."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    members = []
    for name in names:
        if not name.isdigit():
            continue
        pid = int(name)
        fields = _read_stat(pid)
        if fields is not None and fields[3] == b"%d" % session_id:
            members.append((pid, fields[19]))
    return members
