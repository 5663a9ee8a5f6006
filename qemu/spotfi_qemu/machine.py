"""The QEMU process and workdir that Guest (guest.py) and OpenWrtGuest (openwrt.py) share.

QemuMachine keeps the lifecycle state, the workdir's logs and unix
sockets, and the start and stop of the QEMU process. The subclasses build
QEMU's command line, wait for the guest to boot and run commands in it:
Guest through the stand-in's control agent, OpenWrtGuest through the
serial console's shell.
"""

import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

from spotfi_qemu.errors import GuestError, GuestStateError
from spotfi_qemu.qmp import qmp_command

log = logging.getLogger(__name__)

GUEST_BROKER_HOST = "10.0.2.100"
GUEST_BROKER_PORT = 1883
# sockaddr_un takes paths of up to 107 bytes; longer workdirs get a short socket directory.
MAX_SOCKET_PATH = 100

CREATED, RUNNING, STOPPED, CLOSED = "created", "running", "stopped", "closed"


class QemuMachine:
    """Base of the guest controllers: lifecycle state, workdir, QEMU process, QMP and console log.

    A subclass sets LINK_NIC_ID (the NIC that set_link() switches) and
    SOCKET_DIR_PREFIX, and defines start(), execute() and _stop_process().
    """

    LINK_NIC_ID = None
    SOCKET_DIR_PREFIX = None

    def __init__(self, workdir, broker_port, memory, boot_timeout):
        self.workdir = os.path.abspath(workdir)
        self.broker_port = broker_port
        self.memory = memory
        self.boot_timeout = boot_timeout
        self.boot_id = None
        self.boot_seconds = None
        self.accelerator = None

        self._state = CREATED
        self._entered = False
        self._process = None
        self._socket_dir = None

        if "," in self.workdir:
            raise GuestError("workdir %r contains a comma, which QEMU options cannot take "
                             "unescaped; choose another directory" % self.workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self.console_log = os.path.join(self.workdir, "console.log")
        self.qemu_log = os.path.join(self.workdir, "qemu.log")

    # Lifecycle

    def __enter__(self):
        if self._entered:
            raise GuestStateError("this %s is already in use by a with block"
                                  % type(self).__name__)
        self._entered = True
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info):
        self.close()

    @property
    def state(self):
        """"created", "running", "stopped" or "closed".

        "stopped" follows kill(), and in Guest also shutdown() or a guest poweroff.
        """
        return self._state

    @property
    def pid(self):
        process = self._process
        return process.pid if process is not None else None

    @property
    def running(self):
        process = self._process
        return process is not None and process.poll() is None

    def kill(self):
        """SIGKILL QEMU, as a power cut would stop the router; the guest's TCP connections close."""
        self._require(RUNNING, STOPPED, action="kill()")
        self._stop_process()

    def close(self):
        """Kill QEMU if it runs and remove the sockets. The workdir and its disks stay."""
        if self._state == CLOSED:
            return
        self._stop_process()
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None
        self._state = CLOSED

    # Guest access

    def run(self, cmd, timeout=30.0):
        """Run `cmd` in the guest and return (exit_status, stdout).

        The subclass's execute() runs the command and handles `timeout`.
        Call execute() directly to get stderr too.
        """
        result = self.execute(cmd, timeout)
        return result.status, result.stdout

    def set_link(self, up):
        """Set the link of the NIC LINK_NIC_ID up or down from the host (QMP set_link)."""
        self._require(RUNNING, action="set_link()")
        qmp_command(self._socket_path("qmp.sock"), "set_link",
                    {"name": self.LINK_NIC_ID, "up": bool(up)})
        log.info("guest PID %d link %s", self.pid, "up" if up else "down")

    def read_console(self, size=20000):
        """Return the last `size` characters of the guest's serial console."""
        return _read_tail(self.console_log, size)

    # Internals for the subclasses

    def _require(self, *states, action):
        if self._state not in states:
            raise GuestStateError("%s needs a guest in state %s; this one is %s"
                                  % (action, " or ".join(states), self._state))

    def _socket_path(self, name):
        path = os.path.join(self.workdir, name)
        if len(path) <= MAX_SOCKET_PATH:
            return path
        if self._socket_dir is None:
            self._socket_dir = tempfile.mkdtemp(prefix=self.SOCKET_DIR_PREFIX)
        return os.path.join(self._socket_dir, name)

    def _write_broker_forwarder(self, busybox):
        """Write the script that guestfwd runs for each guest connection to the broker.

        Returns the script's path, or None when broker_port is None.
        """
        if self.broker_port is None:
            return None
        path = os.path.join(self.workdir, "broker-forward.sh")
        with open(path, "w") as handle:
            handle.write("#!/bin/sh\n"
                         "# QEMU runs this for each guest connection to %s:%d.\n"
                         "exec '%s' nc 127.0.0.1 %d\n"
                         % (GUEST_BROKER_HOST, GUEST_BROKER_PORT, busybox,
                            int(self.broker_port)))
        os.chmod(path, 0o755)
        return path

    def _popen_qemu(self, argv, socket_names):
        """Start QEMU in a session of its own, with its output appended to qemu.log.

        The unix sockets in `socket_names` that a previous QEMU left behind
        are removed first.
        """
        for name in socket_names:
            path = self._socket_path(name)
            if os.path.exists(path):
                os.remove(path)
        with open(self.qemu_log, "ab") as qemu_log:
            return subprocess.Popen(argv, cwd=self.workdir, stdin=subprocess.DEVNULL,
                                    stdout=qemu_log, stderr=subprocess.STDOUT,
                                    start_new_session=True)

    def _failure_detail(self):
        return "\n--- qemu.log ---\n%s\n--- console.log (end) ---\n%s" % (
            _read_tail(self.qemu_log, 2000), self.read_console(4000))


def user_netdev(netdev_id, forwarder=None, hostfwd=()):
    """Return the -netdev value of a QEMU user network on 10.0.2.0/24 with restrict=on.

    The guest reaches only what is forwarded: GUEST_BROKER_HOST:GUEST_BROKER_PORT
    to the script `forwarder` (None: nothing), and for each (host_port,
    guest_port) in `hostfwd`, host 127.0.0.1:host_port to guest_port.
    """
    netdev = "user,id=%s,restrict=on,net=10.0.2.0/24,host=10.0.2.2" % netdev_id
    if forwarder is not None:
        # The cmd: form starts one forwarder per guest connection, so the
        # broker gets each guest connection opened and closed on its own.
        netdev += ",guestfwd=tcp:%s:%d-cmd:%s" % (GUEST_BROKER_HOST, GUEST_BROKER_PORT, forwarder)
    for host_port, guest_port in hostfwd:
        netdev += ",hostfwd=tcp:127.0.0.1:%d-:%d" % (host_port, guest_port)
    return netdev


def connect_unix_socket(path, description, timeout, is_alive=None):
    """Connect to a unix socket that QEMU serves, retrying until QEMU has created it.

    Raises GuestError naming `description` when `timeout` seconds pass, or
    as soon as `is_alive()` returns False because QEMU has exited.
    """
    deadline = time.monotonic() + timeout
    while True:
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            connection.connect(path)
            return connection
        except OSError as error:
            connection.close()
            if (is_alive is not None and not is_alive()) or time.monotonic() > deadline:
                raise GuestError("cannot connect to %s %s: %s"
                                 % (description, path, error)) from None
            time.sleep(0.02)


def kill_qemu(process, grace=0.5):
    """SIGKILL QEMU by its PID if it still runs, then what is left in its process group."""
    if process.poll() is None:
        process.kill()
        log.info("killed QEMU PID %d", process.pid)
    process.wait()
    kill_process_group(process.pid, grace)


def kill_process_group(pgid, grace=0.5):
    """Give QEMU's children (guestfwd nc processes) `grace` seconds to exit, then SIGKILL the rest."""
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _read_tail(path, size):
    try:
        with open(path, "rb") as handle:
            return handle.read()[-size:].decode("utf-8", "replace")
    except OSError:
        return ""
