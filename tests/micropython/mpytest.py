"""Helpers for tests that run under pytest on CPython and under run_tests.py on MicroPython.

The tests are plain `test_*` functions without arguments, so they need
neither pytest fixtures nor anything MicroPython lacks.
"""

import os
import socket
import sys

MICROPYTHON = sys.implementation.name == "micropython"


def raises(error_type, function, *args):
    """Call function(*args) and return the `error_type` it raises; fail when it raises none."""
    try:
        function(*args)
    except error_type as error:
        return error
    raise AssertionError("%s%r did not raise %s"
                         % (getattr(function, "__name__", function), args, error_type.__name__))


def _exists(path):
    try:
        os.stat(path)
    except OSError:
        return False
    return True


def _is_directory(path):
    try:
        return os.stat(path)[0] & 0o170000 == 0o040000
    except OSError:
        return False


def make_dirs(path):
    """Create directory `path` and its missing parents."""
    current = ""
    for part in path.split("/"):
        if not part:
            current = current or "/"
            continue
        current = current + part if current.endswith("/") else current + "/" + part
        if not _exists(current):
            os.mkdir(current)


def write_file(path, content):
    """Write `content` (str or bytes) to `path`, creating its directory."""
    make_dirs(path[:path.rfind("/")])
    with open(path, "wb") as handle:
        handle.write(content.encode("utf-8") if isinstance(content, str) else content)


def _entries(path):
    """Return (name, file type bits) of each entry of a directory, links not followed."""
    if hasattr(os, "ilistdir"):
        # MicroPython has no lstat; ilistdir gives each entry's type from readdir.
        return [(entry[0], entry[1]) for entry in os.ilistdir(path)]
    return [(name, os.lstat(path + "/" + name)[0] & 0o170000) for name in os.listdir(path)]


def remove_tree(path):
    """Delete directory `path` and everything under it; symbolic links are removed, not followed."""
    if not _is_directory(path):
        return
    for name, kind in _entries(path):
        child = path + "/" + name
        if kind == 0o040000:
            remove_tree(child)
        else:
            os.remove(child)
    os.rmdir(path)


class TempDir:
    """A new directory under /tmp, deleted with its content when the `with` block ends."""

    _count = [0]

    def __enter__(self):
        self._count[0] += 1
        token = "".join(["%02x" % byte for byte in os.urandom(6)])
        self.path = "/tmp/spotfi-mpytest-%s-%d" % (token, self._count[0])
        make_dirs(self.path)
        return self.path

    def __exit__(self, error_type, error, traceback):
        remove_tree(self.path)
        return False


def listen_on_loopback(backlog=1):
    """Return (listening socket, port) on 127.0.0.1.

    MicroPython's socket has no getsockname(), so a port bound as 0 cannot
    be read back: random ports are tried until one binds.
    """
    for _ in range(50):
        port = 20000 + int.from_bytes(os.urandom(2), "big") % 40000
        listener = socket.socket()
        try:
            listener.bind(socket.getaddrinfo("127.0.0.1", port)[0][-1])
        except OSError:
            listener.close()
            continue
        listener.listen(backlog)
        return listener, port
    raise AssertionError("no free port found on 127.0.0.1")
