"""What the agent imports on CPython while it serves: the modules it keeps out stay out.

The idle RSS target (docs/benchmarks.md) depends on the agent never loading
certain standard modules in normal operation. Each costs from 0.4 MB to 4 MB
of RSS on a router, and each is easy to pull in again by accident, e.g. by
`import json`, `import signal` or `getaddrinfo` with a str host. This test
runs the real agent under `python -X importtime` against a real broker,
drives it through connect, metrics and RPCs (agent method and ubus), and
reads every module it imported from its stderr.
"""

import json
import sys

from harness import HostRouter, MqttObserver

# Module -> what pulls it in by accident, for the failure message.
KEPT_OUT = {
    "re": "json, the idna codec or logging",
    "json": "`import json` instead of spotfi_agent.jsoncodec",
    "enum": "socket, signal, re or ssl",
    "socket": "`import socket` instead of _socket",
    "signal": "`import signal` instead of compat.signal",
    "encodings.idna": "getaddrinfo() with a str host name",
    "unicodedata": "the idna codec",
    "subprocess": "`import subprocess` instead of procrun",
    "logging": "`import logging` instead of spotfi_agent.log",
    "ssl": "a TLS import on a plain connection",
    "threading": "a thread-based helper",
    "selectors": "socket or subprocess",
    "typing": "type annotations imported at run time",
    "yaml": "PyYAML loaded with no YAML handler file",
    "ptyprocess": "the terminal adapter loaded before any x-start",
}


def imported_modules(log_text):
    modules = set()
    for line in log_text.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            name = line.rsplit("|", 1)[1].strip()
            if name != "imported package":
                modules.add(name)
    return modules


def test_serving_agent_keeps_heavy_modules_out(mosquitto, tmp_path):
    router = HostRouter(tmp_path, "footprint-r1", [mosquitto.port],
                        interpreter=[sys.executable, "-X", "importtime"])
    base = "spotfi/router/footprint-r1/"
    observer = MqttObserver(mosquitto.port, [base + "status", base + "metrics", base + "rpc/response"])
    router.start()
    try:
        observer.wait_for(base + "status", lambda payload: payload == b"ONLINE", timeout=20)
        observer.wait_for(base + "metrics", timeout=20)
        for request_id, path, method in (("fp-1", "spotfi.agent", "ping"), ("fp-2", "system", "info")):
            observer.publish(base + "rpc/request", json.dumps(
                {"type": "rpc", "id": request_id, "path": path, "method": method, "args": {}}))
            observer.wait_for(base + "rpc/response",
                              lambda payload, wanted=request_id: json.loads(payload)["id"] == wanted,
                              timeout=20)
    finally:
        router.stop()
        observer.close()

    modules = imported_modules(router.log_text())
    assert "spotfi_agent.mqtt" in modules, router.log_text()[-2000:]
    loaded = sorted(name for name in KEPT_OUT if name in modules)
    assert not loaded, "; ".join("%s (usually from %s)" % (name, KEPT_OUT[name]) for name in loaded)
