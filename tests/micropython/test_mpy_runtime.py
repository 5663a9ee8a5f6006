"""Loop, backoff, metrics, RPC validation and handler argv building, on CPython and MicroPython."""

import json
import socket

from mpytest import TempDir, listen_on_loopback, raises, write_file

from spotfi_agent import metrics, rpc
from spotfi_agent.handlers import HandlerArgumentError, HandlerRegistry, parse_template
from spotfi_agent.loop import Loop
from spotfi_agent.mqttversion import VersionChooser
from spotfi_agent.session import Backoff
from spotfi_agent.topics import Topics


def test_backoff_grows_to_cap():
    backoff = Backoff(base=1.0, cap=8.0, floor=0.2, rng=lambda: 1.0)
    delays = [backoff.next_delay() for _ in range(6)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]


def test_backoff_floor_and_reset():
    backoff = Backoff(base=1.0, cap=60.0, floor=0.2, rng=lambda: 0.0)
    assert backoff.next_delay() == 0.2
    assert backoff.next_delay() == 0.2
    assert backoff.attempt == 2
    backoff.reset()
    assert backoff.attempt == 0


def test_backoff_large_attempt_stays_finite():
    backoff = Backoff(base=1.0, cap=60.0, rng=lambda: 0.5)
    backoff.attempt = 1000
    delay = backoff.next_delay()
    assert 0.2 <= delay <= 60.0


def test_loop_timers_run_in_order():
    loop = Loop()
    calls = []
    loop.call_later(0.03, calls.append, "late")
    loop.call_later(0.01, calls.append, "early")
    cancelled = loop.call_later(0.02, calls.append, "cancelled")
    cancelled.cancel()
    loop.call_soon(calls.append, "soon")
    deadline = loop.time() + 2.0
    while len(calls) < 3 and loop.time() < deadline:
        loop.run_once(0.05)
    assert calls == ["soon", "early", "late"]


def test_loop_cancel_releases_callback():
    loop = Loop()
    output = bytearray(100000)
    timer = loop.call_later(30.0, output.extend, output)
    timer.cancel()
    # The timer stays queued until it is due; it must not keep its arguments alive.
    assert timer.callback is None
    assert timer.args == ()


def test_loop_survives_failing_callback():
    loop = Loop()
    calls = []

    def fail():
        raise ValueError("callback bug")

    loop.call_soon(fail)
    loop.call_soon(calls.append, "after")
    loop.run_once(0)
    assert calls == ["after"]


def test_loop_reader_and_writer():
    listener, port = listen_on_loopback()
    loop = Loop()
    events = []
    client = None
    server = None
    try:
        client = socket.socket()
        client.connect(socket.getaddrinfo("127.0.0.1", port)[0][-1])
        server = listener.accept()[0]
        loop.add_writer(client.fileno(), lambda: events.append("writable"))
        loop.run_once(1.0)
        loop.remove_writer(client.fileno())
        assert events == ["writable"]

        loop.add_reader(server.fileno(), lambda: events.append(server.recv(16)))
        client.send(b"ping")
        deadline = loop.time() + 2.0
        while len(events) < 2 and loop.time() < deadline:
            loop.run_once(0.1)
        loop.remove_reader(server.fileno())
        assert events[1] == b"ping"
    finally:
        for sock in (client, server, listener):
            if sock is not None:
                sock.close()


NETDEV = """Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo: 100 1 0 0 0 0 0 0 100 1 0 0 0 0 0 0
  eth0: 1500 10 0 0 0 0 0 0 2500 20 0 0 0 0 0 0
br-lan:7 1 0 0 0 0 0 0 9 1 0 0 0 0 0 0
 bad: x y
"""


def test_metrics_parse_netdev():
    interfaces = metrics.parse_netdev(NETDEV)
    assert interfaces == {"eth0": {"rxBytes": 1500, "txBytes": 2500},
                          "br-lan": {"rxBytes": 7, "txBytes": 9}}


def test_metrics_read_proc_fake_tree():
    with TempDir() as proc:
        write_file(proc + "/uptime", "12345.67 999.00\n")
        write_file(proc + "/loadavg", "0.50 0.25 0.10 1/100 1234\n")
        write_file(proc + "/meminfo", "MemTotal:  1000 kB\nMemFree:  400 kB\n"
                                      "MemAvailable:  600 kB\nBuffers: 1 kB\n")
        write_file(proc + "/net/dev", NETDEV)
        figures = metrics.read_proc(proc)
    assert figures["uptime"] == 12345
    assert figures["load"] == [0.5, 0.25, 0.1]
    assert figures["memory"] == {"MemTotal": 1024000, "MemFree": 409600,
                                 "MemAvailable": 614400}
    assert "eth0" in figures["interfaces"]


def test_metrics_go_keys_and_types():
    proc = {"uptime": 100, "load": [0.5, 0.25, 0.1],
            "memory": {"MemTotal": 2048, "MemFree": 1024, "MemAvailable": 1536}}
    payload = metrics.build_metrics(proc, None, None, {"agentVersion": "x", "reconnects": 0})
    assert payload["type"] == "metrics"
    figures = payload["metrics"]
    assert figures["uptime"] == "100"
    assert isinstance(figures["cpuLoad"], float)
    assert figures["cpuLoad"] == 50.0
    assert figures["totalMemory"] == 2048
    assert figures["freeMemory"] == 1024
    assert figures["activeUsers"] == 0
    assert figures["availableMemory"] == 1536
    assert figures["source"] == "proc"
    assert json.loads(json.dumps(payload)) == payload


def test_metrics_from_ubus_replies():
    system_info = {"uptime": 5000, "load": [65536, 32768, 0],
                   "memory": {"total": 4096, "free": 1000}}
    clients = {"hotspot": {"aa:bb:cc:dd:ee:01": {}, "aa:bb:cc:dd:ee:02": {}}}
    figures = metrics.build_metrics({}, system_info, clients, {})["metrics"]
    assert figures["uptime"] == "5000"
    assert figures["source"] == "ubus"
    assert figures["totalMemory"] == 4096
    assert figures["freeMemory"] == 1000
    assert figures["activeUsers"] == 2
    assert figures["load"] == [1.0, 0.5, 0.0]
    assert 100.0 <= figures["cpuLoad"] <= 100.01


def test_metrics_count_uspot_shapes():
    assert metrics.count_uspot_clients([1, 2, 3]) == 3
    assert metrics.count_uspot_clients({"a": {}, "b": {}}) == 2
    assert metrics.count_uspot_clients("bad") == 0


def test_rpc_parse_request():
    request = rpc._parse_request({"type": "rpc", "id": "a1", "path": "system",
                                  "method": "board", "timeout": 5}, "a1", "reply/topic")
    assert request.path == "system"
    assert request.method == "board"
    assert request.args == {}
    assert request.timeout == 5
    assert request.reply_topic == "reply/topic"


def test_rpc_invalid_requests():
    cases = [
        ({"type": "other", "path": "p", "method": "m"}, "field 'type'"),
        ({"method": "m"}, "field 'path' is missing"),
        ({"path": "", "method": "m"}, "non-empty string"),
        ({"path": "p", "method": "m", "args": [1]}, "field 'args' must be an object"),
        ({"path": "p", "method": "m", "timeout": 0}, "field 'timeout'"),
        ({"path": "p", "method": "m", "timeout": True}, "field 'timeout'"),
        ({"path": "p\x00", "method": "m"}, "NUL"),
        ({"path": "p" * 300, "method": "m"}, "over the limit"),
    ]
    for message, reason in cases:
        error = raises(rpc.RequestError, rpc._parse_request, message, "id", "t")
        assert error.code == "invalid_request"
        assert reason in error.message, (message, error.message)


def test_rpc_id_checks_and_peek():
    assert rpc._check_id("abc") is None
    assert rpc._check_id(7) is None
    assert "boolean" in rpc._check_id(True)
    assert "empty" in rpc._check_id("")
    assert "over the limit" in rpc._check_id("x" * 129)
    assert rpc.peek_id(b'{"path": "id", "id": "r-1", "broken') == "r-1"
    assert rpc.peek_id(b'{"id": 42, ') == 42
    assert rpc.peek_id(b'{"id": 4.5}') is None
    assert rpc.peek_id(b'[{"id": 1}]') is None


def test_rpc_ubus_argv():
    argv = rpc.ubus_argv("/sbin/ubus", "system", "board", {"a": 1}, 2.5)
    assert argv[:5] == ["/sbin/ubus", "-t", "3", "call", "system"]
    assert argv[5] == "board"
    assert json.loads(argv[6]) == {"a": 1}
    assert rpc.ubus_argv("ubus", "p", "m", {}, 0.2)[2] == "1"


def test_handler_templates():
    assert parse_template("plain") == [("text", "plain")]
    assert parse_template("--x={args.name}!") == [("text", "--x="), ("arg", "name"),
                                                   ("text", "!")]
    assert parse_template("{{literal}}") == [("text", "{literal}")]
    for bad in ("{args.}", "{name}", "{args.a b}", "{args.x", "x}"):
        raises(ValueError, parse_template, bad)


def test_handler_registry_builds_argv():
    with TempDir() as directory:
        write_file(directory + "/wifi.json", json.dumps({"handlers": [
            {"path": "wifi", "method": "set", "timeout": 5,
             "command": ["/usr/bin/wifi-set", "--ssid={args.ssid}", "{args.enabled}",
                         "{args.count}"]}]}))
        write_file(directory + "/broken.json", "{not json")
        write_file(directory + "/.hidden.json", "{}")
        registry = HandlerRegistry(directory)
        assert registry.load() == 1
    handler = registry.find("wifi", "set")
    assert handler is not None
    argv = handler.build_argv({"ssid": "café net", "enabled": True, "count": 3})
    assert argv == ["/usr/bin/wifi-set", "--ssid=café net", "true", "3"]
    error = raises(HandlerArgumentError, handler.build_argv, {"ssid": "x", "enabled": 1})
    assert "'count' is missing" in str(error)
    error = raises(HandlerArgumentError, handler.build_argv,
                   {"ssid": ["x"], "enabled": 1, "count": 1})
    assert "array" in str(error)
    raises(HandlerArgumentError, handler.build_argv, {"ssid": "a\x00b", "enabled": 1, "count": 1})


def test_topics_reply_rules():
    topics = Topics("r1")
    assert topics.is_own("spotfi/router/r1/rpc/response")
    assert not topics.is_own(None)


def test_version_chooser_unanswered_and_refused():
    chooser = VersionChooser("router-r1")
    peer = "broker:1883"

    assert chooser.version_for(peer, "5") == "5"
    assert chooser.version_for(peer, "3.1.1") == "3.1.1"

    # No CONNACK for MQTT 5 makes the next attempt 3.1.1. No CONNACK for that
    # either makes the one after it 5 again.
    chooser.unanswered(peer, "5")
    assert chooser.version_for(peer, "5") == "3.1.1"
    chooser.unanswered(peer, "3.1.1")
    assert chooser.version_for(peer, "5") == "5"

    # Unanswered 5, then 3.1.1 accepted: 3.1.1 from then on.
    chooser.unanswered(peer, "5")
    chooser.accepted(peer, "3.1.1")
    chooser.unanswered(peer, "3.1.1")
    assert chooser.version_for(peer, "5") == "3.1.1"

    # A refusal of version 5 also sticks; other brokers keep 5.
    chooser.rejected("other:1883", "CONNACK code 1")
    assert chooser.version_for("other:1883", "5") == "3.1.1"
    assert chooser.version_for("third:1883", "5") == "5"
