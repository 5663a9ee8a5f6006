"""A minimal client for QEMU's QMP socket: greeting, capabilities, one command."""

import json
import socket

from spotfi_qemu.errors import QmpError


def qmp_command(socket_path, command, arguments=None, timeout=10.0):
    """Run one QMP command on a fresh connection and return its "return" value.

    QEMU serves one QMP client at a time, so the connection is closed again
    before returning. Asynchronous events that arrive in between are skipped.
    """
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    connection.settimeout(timeout)
    try:
        connection.connect(socket_path)
        stream = connection.makefile("rwb")
        _read_message(stream, socket_path)  # the greeting
        for name, args in (("qmp_capabilities", None), (command, arguments)):
            message = {"execute": name}
            if args is not None:
                message["arguments"] = args
            stream.write(json.dumps(message).encode("utf-8") + b"\n")
            stream.flush()
            while True:
                reply = _read_message(stream, socket_path)
                if "error" in reply:
                    raise QmpError("QMP %s failed: %s" % (name, reply["error"].get("desc")))
                if "return" in reply:
                    break
        return reply["return"]
    except (OSError, ValueError) as error:
        raise QmpError("QMP %s on %s failed: %s" % (command, socket_path, error)) from None
    finally:
        connection.close()


def _read_message(stream, socket_path):
    line = stream.readline()
    if not line:
        raise QmpError("QEMU closed the QMP socket %s" % socket_path)
    return json.loads(line.decode("utf-8"))
