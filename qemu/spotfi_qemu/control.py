"""Host end of the control channel to the guest's standin-control agent.

QEMU connects the guest's virtio-serial port "org.spotfi.control" to a unix
socket; both ends exchange one JSON object per line. The protocol is written
out in the guest agent, qemu/rootfs/rom/usr/sbin/standin-control.
"""

import json
import socket
import time

from spotfi_qemu.errors import GuestError, GuestTimeoutError
from spotfi_qemu.machine import connect_unix_socket


class ControlChannel:
    """A connection to QEMU's control socket that sends requests and matches replies by id."""

    def __init__(self, socket_path, timeout=10.0, is_alive=None):
        """Connect to `socket_path`, retrying until QEMU has created it or `timeout` passes.

        `is_alive` is called while waiting; when it returns False the wait
        stops early, because QEMU has exited.
        """
        self._socket = connect_unix_socket(socket_path, "the control socket", timeout, is_alive)
        self._buffer = b""
        self._next_id = 0

    def close(self):
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def send(self, op, **fields):
        """Send one request without waiting; return its id."""
        if self._socket is None:
            raise GuestError("the control channel is closed")
        self._next_id += 1
        fields.update(id=self._next_id, op=op)
        self._socket.sendall(json.dumps(fields).encode("utf-8") + b"\n")
        return self._next_id

    def wait_reply(self, request_id, timeout):
        """Return the reply to `request_id`; replies to older requests are dropped.

        Raises GuestTimeoutError when none comes within `timeout` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self._buffer:
                line, self._buffer = self._buffer.split(b"\n", 1)
                try:
                    reply = json.loads(line.decode("utf-8"))
                except ValueError:
                    continue
                if isinstance(reply, dict) and reply.get("id") == request_id:
                    return reply
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise GuestTimeoutError("the guest control agent sent no reply to request %d "
                                        "within %.1f s" % (request_id, timeout))
            self._socket.settimeout(remaining)
            try:
                chunk = self._socket.recv(262144)
            except socket.timeout:
                continue
            except OSError as error:
                raise GuestError("reading the control socket failed: %s" % error) from None
            if not chunk:
                raise GuestError("QEMU closed the control socket; the guest is gone")
            self._buffer += chunk

    def request(self, op, reply_timeout, **fields):
        """Send a request and return its reply; raise GuestError when the agent reports a failure."""
        reply = self.wait_reply(self.send(op, **fields), reply_timeout)
        if not reply.get("ok"):
            raise GuestError("guest request %s failed: %s" % (op, reply.get("error")))
        return reply
