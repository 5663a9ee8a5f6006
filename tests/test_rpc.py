"""RpcDispatcher against real child processes, through tests/bin/ubus_test_double.

The double replaces OpenWrt's `ubus`, which this machine cannot have.
CollectingContext replaces the agent's MQTT session: publish() stores what
would be sent, so each test sees the exact results.
"""

import json
import logging
import os
import time

import pytest

from spotfi_agent import rpc
from spotfi_agent.loop import Loop
from spotfi_agent.topics import Topics

TESTS = os.path.dirname(os.path.abspath(__file__))
UBUS_DOUBLE = os.path.join(TESTS, "bin", "ubus_test_double")
ROUTER_ID = "r1"
RESPONSE_TOPIC = "spotfi/router/r1/rpc/response"
DEADLINE = 15.0


class Settings:
    def __init__(self, **overrides):
        self.rpc_timeout = 30
        self.rpc_max_concurrent = 4
        self.handlers_dir = "/etc/spotfi/handlers.d"
        self.ubus = UBUS_DOUBLE
        self.root = "/"
        for name, value in overrides.items():
            setattr(self, name, value)


class CollectingContext:
    """The attributes the agent gives RpcDispatcher; publish() stores messages in a list."""

    def __init__(self, settings, info=None):
        self.loop = Loop()
        self.router_id = ROUTER_ID
        self.topics = Topics(ROUTER_ID)
        self.settings = settings
        self.published = []
        self.published_properties = []
        self.publish_result = True
        self._info = info if info is not None else {"version": "test", "routerId": ROUTER_ID}

    def publish(self, topic, payload, qos=0, retain=False, properties=None):
        self.published.append((topic, payload, qos, retain))
        self.published_properties.append(properties)
        return self.publish_result

    def path(self, absolute_path):
        root = self.settings.root
        if root in ("", "/"):
            return absolute_path
        return root.rstrip("/") + absolute_path

    def agent_info(self):
        if isinstance(self._info, Exception):
            raise self._info
        return self._info

    def results(self):
        return [json.loads(payload) for topic, payload, qos, retain in self.published]

    def wait_for(self, count, deadline=DEADLINE):
        """Run the loop until `count` messages are published or the deadline passes."""
        end = time.monotonic() + deadline
        while len(self.published) < count and time.monotonic() < end:
            self.loop.run_once(0.05)
        return self.results()


@pytest.fixture
def make_dispatcher(tmp_path):
    dispatchers = []

    def make(info=None, handlers=None, **overrides):
        overrides.setdefault("handlers_dir", str(tmp_path / "handlers.d"))
        if handlers is not None:
            os.makedirs(overrides["handlers_dir"], exist_ok=True)
            for name, content in handlers.items():
                with open(os.path.join(overrides["handlers_dir"], name), "w") as handle:
                    handle.write(content if isinstance(content, str) else json.dumps(content))
        context = CollectingContext(Settings(**overrides), info)
        dispatcher = rpc.RpcDispatcher(context)
        dispatchers.append(dispatcher)
        return context, dispatcher

    yield make
    for dispatcher in dispatchers:
        dispatcher.close()


def request(request_id, path, method, args=None, **extra):
    message = {"type": "rpc", "id": request_id, "path": path, "method": method}
    if args is not None:
        message["args"] = args
    message.update(extra)
    return json.dumps(message).encode()


def pid_gone(pid):
    """Return True when `pid` has exited (a zombie waiting for its parent counts as exited)."""
    try:
        with open("/proc/%d/stat" % pid) as handle:
            state = handle.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def wait_pids_gone(pids, deadline=10.0):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if all(pid_gone(pid) for pid in pids):
            return True
        time.sleep(0.05)
    return False


def read_pids(pidfile, deadline=10.0):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if os.path.exists(pidfile):
            with open(pidfile) as handle:
                text = handle.read().split()
            if len(text) == 2:
                return [int(value) for value in text]
        time.sleep(0.02)
    raise AssertionError("the ubus test double did not write %s" % pidfile)


# Successful calls.


def test_ubus_success_parses_json(make_dispatcher):
    context, dispatcher = make_dispatcher()
    dispatcher.handle(request("a1", "system", "board"))
    results = context.wait_for(1)
    assert len(results) == 1
    topic, payload, qos, retain = context.published[0]
    assert topic == RESPONSE_TOPIC
    assert qos == 1
    assert retain is False
    result = results[0]
    assert set(result) == {"type", "id", "status", "result"}
    assert result["type"] == "rpc-result"
    assert result["id"] == "a1"
    assert result["status"] == "success"
    assert result["result"]["release"]["distribution"] == "OpenWrt"


def test_ubus_system_info_shape(make_dispatcher):
    context, dispatcher = make_dispatcher()
    dispatcher.handle(request(7, "system", "info", {}))
    result = context.wait_for(1)[0]
    assert result["id"] == 7
    info = result["result"]
    assert len(info["load"]) == 3
    assert set(info["memory"]) == {"total", "free", "shared", "buffered", "available", "cached"}
    assert "uptime" in info
    assert "localtime" in info
    assert "swap" in info


def test_ubus_args_passed_as_json(make_dispatcher):
    context, dispatcher = make_dispatcher()
    args = {"name": "a b; rm -rf /", "count": 3, "nested": {"flag": True}}
    dispatcher.handle(request("e1", "test", "echo", args))
    result = context.wait_for(1)[0]
    assert result["status"] == "success"
    assert result["result"] == args


def test_ubus_found_on_path(make_dispatcher, tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    os.symlink(UBUS_DOUBLE, str(bin_dir / "ubus"))
    monkeypatch.setenv("PATH", "%s:/usr/bin:/bin" % bin_dir)
    context, dispatcher = make_dispatcher(ubus="ubus")
    dispatcher.handle(request("p1", "uspot", "client_list"))
    result = context.wait_for(1)[0]
    assert result["status"] == "success"
    assert sum(len(clients) for clients in result["result"].values()) == 4


# ubus failures.


def test_ubus_exit_4_is_not_found(make_dispatcher):
    context, dispatcher = make_dispatcher()
    dispatcher.handle(request("f1", "test", "fail"))
    result = context.wait_for(1)[0]
    assert result["status"] == "error"
    assert result["code"] == "not_found"
    assert result["result"] is None
    assert result["stderr"] == "Command failed: Not found"
    assert result["error"] == "ubus call test fail failed with exit status 4"


def test_ubus_unknown_method_is_not_found(make_dispatcher):
    context, dispatcher = make_dispatcher()
    dispatcher.handle(request("f2", "system", "nonexistent"))
    result = context.wait_for(1)[0]
    assert result["code"] == "not_found"
    assert result["stderr"] == "Command failed: Method not found"


def test_ubus_other_exit_is_failed(make_dispatcher):
    context, dispatcher = make_dispatcher()
    dispatcher.handle(request("f3", "test", "exit", {"status": 6}))
    result = context.wait_for(1)[0]
    assert result["status"] == "error"
    assert result["code"] == "failed"
    assert result["stderr"] == "Command failed: Permission denied"
    assert "exit status 6" in result["error"]


def test_ubus_exit_7_is_timeout(make_dispatcher):
    context, dispatcher = make_dispatcher()
    dispatcher.handle(request("f4", "test", "exit", {"status": 7}))
    result = context.wait_for(1)[0]
    assert result["code"] == "timeout"
    assert result["stderr"] == "Command failed: Request timed out"


def test_ubus_missing_from_path(make_dispatcher, tmp_path, monkeypatch, logs):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    context, dispatcher = make_dispatcher(ubus="ubus")
    dispatcher.handle(request("m1", "system", "board"))
    dispatcher.handle(request("m2", "system", "board"))
    results = context.wait_for(2)
    assert [result["code"] for result in results] == ["ubus_missing", "ubus_missing"]
    assert results[0]["error"].startswith("ubus not found on PATH: ")
    assert "install OpenWrt's ubus or set option ubus" in results[0]["error"]
    assert str(empty) in results[0]["error"]
    assert results[0]["stderr"] == ""
    assert dispatcher.running_count == 0
    errors = [message for message in logs.messages(logging.ERROR) if "ubus not found" in message]
    assert len(errors) == 1


def test_ubus_missing_absolute_path(make_dispatcher, tmp_path):
    missing = str(tmp_path / "no" / "ubus")
    context, dispatcher = make_dispatcher(ubus=missing)
    dispatcher.handle(request("m3", "system", "board"))
    result = context.wait_for(1)[0]
    assert result["code"] == "ubus_missing"
    assert missing in result["error"]


def test_ubus_not_executable_is_missing(make_dispatcher, tmp_path):
    plain = tmp_path / "ubus"
    plain.write_text("#!/bin/sh\n")
    context, dispatcher = make_dispatcher(ubus=str(plain))
    dispatcher.handle(request("m4", "system", "board"))
    assert context.wait_for(1)[0]["code"] == "ubus_missing"


# Timeouts and the process group.


def test_timeout_kills_process_group(make_dispatcher, tmp_path):
    pidfile = str(tmp_path / "pids")
    context, dispatcher = make_dispatcher()
    dispatcher.handle(request("t1", "test", "sleep", {"seconds": 30, "pidfile": pidfile},
                              timeout=0.5))
    started = time.monotonic()
    result = context.wait_for(1)[0]
    elapsed = time.monotonic() - started
    assert result["code"] == "timeout"
    assert result["result"] is None
    assert "timed out after 0.5 s" in result["error"]
    assert elapsed < 20
    shell_pid, sleep_pid = read_pids(pidfile)
    assert wait_pids_gone([shell_pid, sleep_pid])
    assert dispatcher.running_count == 0


def test_request_timeout_never_raises(make_dispatcher):
    context, dispatcher = make_dispatcher(rpc_timeout=1)
    dispatcher.handle(request("t2", "test", "sleep", {"seconds": 30}, timeout=120))
    result = context.wait_for(1)[0]
    assert result["code"] == "timeout"
    assert "after 1 s" in result["error"]


def test_request_timeout_lowers(make_dispatcher):
    context, dispatcher = make_dispatcher(rpc_timeout=30)
    started = time.monotonic()
    dispatcher.handle(request("t3", "test", "sleep", {"seconds": 20}, timeout=0.3))
    result = context.wait_for(1)[0]
    assert result["code"] == "timeout"
    assert "after 0.3 s" in result["error"]
    assert time.monotonic() - started < 15


def test_ubus_argv_rounds_timeout_up():
    assert rpc.ubus_argv("/sbin/ubus", "system", "board", {}, 0.3) == [
        "/sbin/ubus", "-t", "1", "call", "system", "board", "{}"]
    assert rpc.ubus_argv("ubus", "a", "b", {"x": 1}, 2.5)[:3] == ["ubus", "-t", "3"]
    assert rpc.ubus_argv("ubus", "a", "b", {}, 30)[2] == "30"
    assert json.loads(rpc.ubus_argv("ubus", "a", "b", {"x": [1, 2]}, 30)[6]) == {"x": [1, 2]}


# Concurrency.


def test_busy_beyond_max_concurrent(make_dispatcher, tmp_path):
    context, dispatcher = make_dispatcher(rpc_max_concurrent=2)
    pidfiles = [str(tmp_path / "pids1"), str(tmp_path / "pids2")]
    for index, pidfile in enumerate(pidfiles):
        dispatcher.handle(request("s%d" % index, "test", "sleep",
                                  {"seconds": 30, "pidfile": pidfile}))
    assert dispatcher.running_count == 2
    assert context.published == []

    dispatcher.handle(request("over", "system", "board"))
    # The busy result is sent at once, before the loop runs.
    assert len(context.published) == 1
    busy = context.results()[0]
    assert busy["id"] == "over"
    assert busy["code"] == "busy"
    assert "rpc_max_concurrent" in busy["error"]

    # Agent methods run no command, so they do not count against the limit.
    dispatcher.handle(request("ping", "spotfi.agent", "ping"))
    assert context.results()[1]["status"] == "success"

    pids = []
    for pidfile in pidfiles:
        pids.extend(read_pids(pidfile))
    dispatcher.close()
    assert dispatcher.running_count == 0
    end = time.monotonic() + 2
    while time.monotonic() < end:
        context.loop.run_once(0.05)
    assert wait_pids_gone(pids)
    # Results of calls killed by close() are not sent.
    assert len(context.published) == 2


def test_capacity_released_after_call(make_dispatcher):
    context, dispatcher = make_dispatcher(rpc_max_concurrent=1)
    dispatcher.handle(request("c1", "test", "sleep", {"seconds": 0.2}))
    assert context.wait_for(1)[0]["result"] == {"slept": 0.2}
    assert dispatcher.running_count == 0
    dispatcher.handle(request("c2", "system", "board"))
    results = context.wait_for(2)
    assert results[1]["status"] == "success"


def test_slow_call_does_not_block_others(make_dispatcher):
    context, dispatcher = make_dispatcher()
    dispatcher.handle(request("slow", "test", "sleep", {"seconds": 3}))
    dispatcher.handle(request("fast", "system", "board"))
    results = context.wait_for(1)
    assert results[0]["id"] == "fast"
    results = context.wait_for(2)
    assert results[1]["id"] == "slow"


# Output size.


def test_output_over_cap_truncated(make_dispatcher):
    context, dispatcher = make_dispatcher()
    dispatcher.handle(request("big", "test", "big", {"bytes": 300000}))
    result = context.wait_for(1)[0]
    assert result["status"] == "success"
    assert result["truncated"] is True
    assert isinstance(result["result"], str)
    assert len(result["result"]) == 256 * 1024
    assert result["result"].startswith('{"data":"xxx')


def test_output_under_cap_parsed(make_dispatcher):
    context, dispatcher = make_dispatcher()
    dispatcher.handle(request("big", "test", "big", {"bytes": 200000}))
    result = context.wait_for(1)[0]
    assert "truncated" not in result
    assert len(result["result"]["data"]) == 200000 - 11


# Invalid requests.

REPLIED = [
    ("type not rpc", {"type": "x-start", "id": "b1", "path": "system", "method": "board"},
     "'type'"),
    ("path missing", {"id": "b1", "method": "board"}, "'path' is missing"),
    ("path number", {"id": "b1", "path": 5, "method": "board"}, "'path'"),
    ("path empty", {"id": "b1", "path": "", "method": "board"}, "'path'"),
    ("path too long", {"id": "b1", "path": "p" * 257, "method": "board"}, "over the limit"),
    ("path with NUL", {"id": "b1", "path": "sys\u0000tem", "method": "board"}, "NUL"),
    ("path lone surrogate", {"id": "b1", "path": "\ud800", "method": "board"}, "Unicode"),
    ("method missing", {"id": "b1", "path": "system"}, "'method' is missing"),
    ("method null", {"id": "b1", "path": "system", "method": None}, "'method'"),
    ("method list", {"id": "b1", "path": "system", "method": ["board"]}, "'method'"),
    ("args list", {"id": "b1", "path": "system", "method": "board", "args": [1]}, "'args'"),
    ("args string", {"id": "b1", "path": "system", "method": "board", "args": "{}"}, "'args'"),
    ("timeout zero", {"id": "b1", "path": "system", "method": "board", "timeout": 0},
     "'timeout'"),
    ("timeout negative", {"id": "b1", "path": "system", "method": "board", "timeout": -1},
     "'timeout'"),
    ("timeout string", {"id": "b1", "path": "system", "method": "board", "timeout": "5"},
     "'timeout'"),
    ("timeout boolean", {"id": "b1", "path": "system", "method": "board", "timeout": True},
     "'timeout'"),
]


@pytest.mark.parametrize("case, message, expected", REPLIED, ids=[case[0] for case in REPLIED])
def test_invalid_field_replied(make_dispatcher, logs, case, message, expected):
    context, dispatcher = make_dispatcher()
    dispatcher.handle(json.dumps(message).encode())
    assert dispatcher.running_count == 0
    results = context.results()
    assert len(results) == 1
    assert results[0]["id"] == "b1"
    assert results[0]["status"] == "error"
    assert results[0]["code"] == "invalid_request"
    assert results[0]["result"] is None
    assert results[0]["stderr"] == ""
    assert expected in results[0]["error"]
    assert len([m for m in logs.messages() if "rpc b1" in m]) == 1


def test_timeout_nan_rejected(make_dispatcher):
    context, dispatcher = make_dispatcher()
    dispatcher.handle(b'{"id": "n1", "path": "system", "method": "board", "timeout": NaN}')
    result = context.results()[0]
    assert result["code"] == "invalid_request"
    assert "'timeout'" in result["error"]


DROPPED = [
    ("not json", b"not json at all", "not valid JSON"),
    ("invalid utf-8", b'{"id": "\xff\xfe"}', "not valid JSON"),
    ("array", b'[{"id": "x"}]', "array, not an object"),
    ("string", b'"hello"', "string, not an object"),
    ("missing id", b'{"path": "system", "method": "board"}', "has no id"),
    ("id boolean", b'{"id": true, "path": "system", "method": "board"}', "boolean"),
    ("id float", b'{"id": 1.5, "path": "system", "method": "board"}', "number"),
    ("id object", b'{"id": {}, "path": "system", "method": "board"}', "object"),
    ("id null", b'{"id": null, "path": "system", "method": "board"}', "null"),
    ("id empty", b'{"id": "", "path": "system", "method": "board"}', "empty"),
    ("id too long", json.dumps({"id": "i" * 129, "path": "s", "method": "m"}).encode(),
     "over the limit"),
    ("empty payload", b"", "not valid JSON"),
]


@pytest.mark.parametrize("case, payload, reason", DROPPED, ids=[case[0] for case in DROPPED])
def test_unreadable_id_logged_once(make_dispatcher, logs, case, payload, reason):
    context, dispatcher = make_dispatcher()
    dispatcher.handle(payload)
    assert context.published == []
    assert dispatcher.running_count == 0
    warnings = logs.messages()
    assert len(warnings) == 1
    assert "dropped" in warnings[0]
    assert reason in warnings[0]


def test_invalid_json_with_readable_id(make_dispatcher):
    context, dispatcher = make_dispatcher()
    dispatcher.handle(b'{"id": "j1", "path": "system", "method": ')
    results = context.results()
    assert len(results) == 1
    assert results[0]["id"] == "j1"
    assert results[0]["code"] == "invalid_request"
    assert "not valid JSON" in results[0]["error"]


def oversized(start):
    return start + b', "args": {"pad": "' + b"x" * (70 * 1024) + b'"}}'


def test_oversized_payload_with_string_id(make_dispatcher):
    context, dispatcher = make_dispatcher()
    dispatcher.handle(oversized(b'{"type": "rpc", "id": "big-1", "path": "system", "method": "x"'))
    results = context.results()
    assert len(results) == 1
    assert results[0]["id"] == "big-1"
    assert results[0]["code"] == "invalid_request"
    assert "65536 bytes" in results[0]["error"]
    assert dispatcher.running_count == 0
    assert context.published[0][0] == RESPONSE_TOPIC


def test_oversized_payload_with_integer_id(make_dispatcher):
    context, dispatcher = make_dispatcher()
    dispatcher.handle(oversized(b'{"id": -42, "path": "system", "method": "x"'))
    assert context.results()[0]["id"] == -42


def test_oversized_payload_without_id(make_dispatcher, logs):
    context, dispatcher = make_dispatcher()
    dispatcher.handle(oversized(b'{"path": "system", "method": "x"'))
    assert context.published == []
    warnings = logs.messages()
    assert len(warnings) == 1
    assert "65536 bytes" in warnings[0]
    # Only a short prefix of the payload reaches the log.
    assert "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx" not in warnings[0]
    assert len(warnings[0]) < 500


def test_peek_id_cases():
    assert rpc.peek_id(b'{"id":"a"') == "a"
    assert rpc.peek_id(b'{"path": "id", "id": 5, "x"') == 5
    assert rpc.peek_id(b'  {"type": "rpc", "id" : 12, "x"') == 12
    assert rpc.peek_id(b'{"id": "with \\" escape"') is None
    assert rpc.peek_id(b'{"id": 1.5') is None
    assert rpc.peek_id(b'{"id": true') is None
    assert rpc.peek_id(b'{"id": ""') is None
    assert rpc.peek_id(b'["id", 1]') is None
    assert rpc.peek_id(b'{"path": "x"') is None
    assert rpc.peek_id(b'{"id": "' + b"i" * 129 + b'"') is None
    assert rpc.peek_id(b" " * 2000 + b'{"id": "late"') is None


def test_payload_as_text_accepted(make_dispatcher):
    context, dispatcher = make_dispatcher()
    dispatcher.handle(json.dumps({"id": "s1", "path": "spotfi.agent", "method": "ping"}))
    assert context.results()[0]["status"] == "success"


def test_garbage_never_raises(make_dispatcher):
    context, dispatcher = make_dispatcher()
    payloads = [b"{", b"}", b"null", b"0", b"{}", b'{"id": []}', b"\x00" * 10,
                b'{"id": "g", "args": {}}', b'{"id": "g", "path": {}, "method": {}}',
                bytes(range(256)), b'{"id": "g", "path": "spotfi.agent", "method": "x",'
                b' "responseTopic": {"a": 1}}']
    for payload in payloads:
        dispatcher.handle(payload)
    assert dispatcher.running_count == 0


# Agent methods.


def test_agent_ping(make_dispatcher):
    context, dispatcher = make_dispatcher()
    before = int(time.time())
    dispatcher.handle(request("g1", "spotfi.agent", "ping"))
    result = context.results()[0]
    assert result["result"]["pong"] is True
    assert before - 1 <= result["result"]["time"] <= int(time.time()) + 1


def test_agent_info(make_dispatcher):
    context, dispatcher = make_dispatcher(info={"version": "1.2.3", "routerId": "r1"})
    dispatcher.handle(request("g2", "spotfi.agent", "info"))
    assert context.results()[0]["result"] == {"version": "1.2.3", "routerId": "r1"}


def test_agent_info_error_is_failed(make_dispatcher, logs):
    context, dispatcher = make_dispatcher(info=RuntimeError("no uptime"))
    dispatcher.handle(request("g3", "spotfi.agent", "info"))
    result = context.results()[0]
    assert result["code"] == "failed"
    assert "no uptime" in result["error"]


def test_agent_unknown_method(make_dispatcher):
    context, dispatcher = make_dispatcher()
    dispatcher.handle(request("g4", "spotfi.agent", "reboot"))
    result = context.results()[0]
    assert result["code"] == "not_found"
    assert "reboot" in result["error"]
    assert "ping, info, handlers" in result["error"]
    assert dispatcher.running_count == 0


# Response topics.


def test_response_topic_inside_prefix(make_dispatcher, logs):
    context, dispatcher = make_dispatcher()
    topic = "spotfi/router/r1/rpc/response/api-7"
    dispatcher.handle(request("r1", "system", "board", responseTopic=topic))
    context.wait_for(1)
    assert context.published[0][0] == topic
    assert context.published[0][2] == 1
    assert logs.messages() == []


def test_response_topic_used_for_errors(make_dispatcher):
    context, dispatcher = make_dispatcher()
    topic = "spotfi/router/r1/rpc/response/api-7"
    dispatcher.handle(request("r2", "system", "", responseTopic=topic))
    assert context.published[0][0] == topic
    assert context.results()[0]["code"] == "invalid_request"


@pytest.mark.parametrize("topic", [
    "spotfi/router/r2/rpc/response",
    "spotfi/api/api-1/x/out",
    "spotfi/router/r1/",
    "spotfi/router/r1/rpc/#",
    "spotfi/router/r1/+/response",
    42,
    ["spotfi/router/r1/rpc/response/a"],
])
def test_response_topic_outside_prefix(make_dispatcher, logs, topic):
    context, dispatcher = make_dispatcher()
    dispatcher.handle(request("r3", "spotfi.agent", "ping", responseTopic=topic))
    assert context.published[0][0] == RESPONSE_TOPIC
    assert context.results()[0]["status"] == "success"
    warnings = logs.messages()
    assert len(warnings) == 1
    assert "rpc r3" in warnings[0]
    assert "responseTopic" in warnings[0]


def test_mqtt5_response_topic_and_correlation(make_dispatcher, logs):
    context, dispatcher = make_dispatcher()
    topic = "spotfi/router/r1/rpc/response/api-5"
    dispatcher.handle(request("p1", "system", "board"),
                      {"response_topic": topic, "correlation_data": b"\x00c-p1"})
    results = context.wait_for(1)
    assert context.published[0][0] == topic
    assert context.published_properties == [{"correlation_data": b"\x00c-p1"}]
    assert results[0]["status"] == "success"
    assert sorted(results[0]) == ["id", "result", "status", "type"]
    assert logs.messages() == []


def test_mqtt5_correlation_without_response_topic(make_dispatcher):
    context, dispatcher = make_dispatcher()
    dispatcher.handle(request("p2", "spotfi.agent", "ping"), {"correlation_data": b"c-p2"})
    assert context.published[0][0] == RESPONSE_TOPIC
    assert context.published_properties == [{"correlation_data": b"c-p2"}]


def test_no_properties_publishes_none(make_dispatcher):
    context, dispatcher = make_dispatcher()
    dispatcher.handle(request("p3", "spotfi.agent", "ping"), {})
    dispatcher.handle(request("p4", "spotfi.agent", "ping"))
    assert context.published_properties == [None, None]


def test_mqtt5_response_topic_beats_field(make_dispatcher, logs):
    context, dispatcher = make_dispatcher()
    field_topic = "spotfi/router/r1/rpc/response/from-field"
    property_topic = "spotfi/router/r1/rpc/response/from-property"
    dispatcher.handle(request("p5", "spotfi.agent", "ping", responseTopic=field_topic),
                      {"response_topic": property_topic})
    assert [message[0] for message in context.published] == [property_topic]
    assert logs.messages() == []


@pytest.mark.parametrize("topic", [
    "spotfi/router/r2/rpc/response",
    "spotfi/router/r1/",
    "spotfi/router/r1/rpc/#",
    "other/topic",
])
def test_mqtt5_response_topic_outside_prefix(make_dispatcher, logs, topic):
    context, dispatcher = make_dispatcher()
    valid_field = "spotfi/router/r1/rpc/response/from-field"
    dispatcher.handle(request("p6", "spotfi.agent", "ping", responseTopic=valid_field),
                      {"response_topic": topic, "correlation_data": b"c-p6"})
    assert context.published[0][0] == RESPONSE_TOPIC
    assert context.published_properties == [{"correlation_data": b"c-p6"}]
    warnings = logs.messages()
    assert len(warnings) == 1
    assert "rpc p6" in warnings[0]
    assert "MQTT 5 Response Topic" in warnings[0]


def test_mqtt5_properties_on_invalid_request(make_dispatcher):
    context, dispatcher = make_dispatcher()
    topic = "spotfi/router/r1/rpc/response/api-5"
    dispatcher.handle(request("p7", "system", ""),
                      {"response_topic": topic, "correlation_data": b"c-p7"})
    assert context.published[0][0] == topic
    assert context.published_properties == [{"correlation_data": b"c-p7"}]
    assert context.results()[0]["code"] == "invalid_request"


def test_mqtt5_properties_on_unparsable_payload(make_dispatcher):
    # The JSON field cannot be read here, but the property can.
    context, dispatcher = make_dispatcher()
    topic = "spotfi/router/r1/rpc/response/api-5"
    dispatcher.handle(b'{"id": "p8", "path": ', {"response_topic": topic,
                                                  "correlation_data": b"c-p8"})
    assert context.published[0][0] == topic
    assert context.published_properties == [{"correlation_data": b"c-p8"}]
    assert context.results()[0]["id"] == "p8"
    assert context.results()[0]["code"] == "invalid_request"


def test_publish_failure_logged(make_dispatcher, logs):
    context, dispatcher = make_dispatcher()
    context.publish_result = False
    dispatcher.handle(request("q1", "spotfi.agent", "ping"))
    warnings = logs.messages()
    assert len(warnings) == 1
    assert "rpc q1" in warnings[0]
    assert "lost" in warnings[0]


# Operator handlers through the dispatcher.

OPS = {"handlers": [
    {"path": "ops", "method": "greet", "command": ["/bin/echo", "hello {args.name}"],
     "description": "Print a greeting"},
    {"path": "ops", "method": "json", "timeout": 5,
     "command": ["/bin/sh", "-c", "printf '{{\"n\": %s, \"s\": \"%s\"}}' \"$1\" \"$2\"", "sh",
                 "{args.n}", "{args.s}"]},
    {"path": "ops", "method": "touch", "command": ["/bin/sh", "-c", ": > \"$1\"", "sh",
                                                   "{args.file}"]},
    {"path": "ops", "method": "fail",
     "command": ["/bin/sh", "-c", "echo 'disk full' >&2; exit 3"]},
    {"path": "ops", "method": "slow", "timeout": 0.5, "command": ["/bin/sleep", "30"]},
    {"path": "ops", "method": "quiet", "command": ["/bin/true"]},
    {"path": "ops", "method": "absent", "command": ["/nonexistent/program"]},
    {"path": "system", "method": "board", "command": ["/bin/echo", "{{\"overridden\": true}}"]},
]}


def test_handler_text_output(make_dispatcher):
    context, dispatcher = make_dispatcher(handlers={"ops.json": OPS})
    dispatcher.handle(request("h1", "ops", "greet", {"name": "bob; reboot"}))
    result = context.wait_for(1)[0]
    assert result["status"] == "success"
    assert result["result"] == "hello bob; reboot\n"


def test_handler_json_output(make_dispatcher):
    context, dispatcher = make_dispatcher(handlers={"ops.json": OPS})
    dispatcher.handle(request("h2", "ops", "json", {"n": 5, "s": True}))
    assert context.wait_for(1)[0]["result"] == {"n": 5, "s": "true"}


def test_handler_takes_precedence_over_ubus(make_dispatcher):
    context, dispatcher = make_dispatcher(handlers={"ops.json": OPS})
    dispatcher.handle(request("h3", "system", "board"))
    assert context.wait_for(1)[0]["result"] == {"overridden": True}


def test_handler_missing_arg_runs_nothing(make_dispatcher, tmp_path):
    context, dispatcher = make_dispatcher(handlers={"ops.json": OPS})
    dispatcher.handle(request("h4", "ops", "touch", {"other": "x"}))
    assert dispatcher.running_count == 0
    result = context.results()[0]
    assert result["code"] == "invalid_request"
    assert "'file'" in result["error"]
    assert "missing" in result["error"]


def test_handler_non_scalar_arg_runs_nothing(make_dispatcher, tmp_path):
    marker = str(tmp_path / "marker")
    context, dispatcher = make_dispatcher(handlers={"ops.json": OPS})
    dispatcher.handle(request("h5", "ops", "touch", {"file": [marker]}))
    assert dispatcher.running_count == 0
    result = context.results()[0]
    assert result["code"] == "invalid_request"
    assert "'file'" in result["error"]
    assert "array" in result["error"]
    assert not os.path.exists(marker)


def test_handler_runs_with_placeholder(make_dispatcher, tmp_path):
    marker = str(tmp_path / "marker file")
    context, dispatcher = make_dispatcher(handlers={"ops.json": OPS})
    dispatcher.handle(request("h6", "ops", "touch", {"file": marker}))
    result = context.wait_for(1)[0]
    assert result["status"] == "success"
    assert result["result"] is None
    assert os.path.exists(marker)


def test_handler_failure_includes_stderr(make_dispatcher):
    context, dispatcher = make_dispatcher(handlers={"ops.json": OPS})
    dispatcher.handle(request("h7", "ops", "fail"))
    result = context.wait_for(1)[0]
    assert result["code"] == "failed"
    assert result["stderr"] == "disk full"
    assert "exit status 3" in result["error"]
    assert "handler ops fail" in result["error"]


def test_handler_timeout_from_file(make_dispatcher):
    context, dispatcher = make_dispatcher(handlers={"ops.json": OPS})
    dispatcher.handle(request("h8", "ops", "slow"))
    result = context.wait_for(1)[0]
    assert result["code"] == "timeout"
    assert "after 0.5 s" in result["error"]


def test_handler_program_missing(make_dispatcher):
    context, dispatcher = make_dispatcher(handlers={"ops.json": OPS})
    dispatcher.handle(request("h9", "ops", "absent"))
    result = context.wait_for(1)[0]
    assert result["code"] == "failed"
    assert "/nonexistent/program" in result["error"]


def test_handler_empty_output_is_null(make_dispatcher):
    context, dispatcher = make_dispatcher(handlers={"ops.json": OPS})
    dispatcher.handle(request("h10", "ops", "quiet"))
    assert context.wait_for(1)[0]["result"] is None


def test_agent_handlers_method_lists(make_dispatcher):
    context, dispatcher = make_dispatcher(handlers={"ops.json": OPS}, rpc_timeout=20)
    dispatcher.handle(request("h11", "spotfi.agent", "handlers"))
    listed = context.results()[0]["result"]
    assert len(listed) == len(OPS["handlers"])
    greet = [entry for entry in listed if entry["method"] == "greet"][0]
    assert greet == {"path": "ops", "method": "greet", "timeout": 20,
                     "description": "Print a greeting"}
    slow = [entry for entry in listed if entry["method"] == "slow"][0]
    assert slow["timeout"] == 0.5


def test_handlers_dir_under_root(make_dispatcher, tmp_path):
    root = tmp_path / "rootfs"
    handlers_dir = root / "etc" / "spotfi" / "handlers.d"
    handlers_dir.mkdir(parents=True)
    (handlers_dir / "ops.json").write_text(json.dumps(OPS))
    context, dispatcher = make_dispatcher(root=str(root), handlers_dir="/etc/spotfi/handlers.d")
    dispatcher.handle(request("h12", "ops", "greet", {"name": "x"}))
    assert context.wait_for(1)[0]["result"] == "hello x\n"


def test_reload_handlers(make_dispatcher, tmp_path):
    context, dispatcher = make_dispatcher(handlers={})
    assert dispatcher.list_handlers() == []
    handlers_dir = tmp_path / "handlers.d"
    (handlers_dir / "ops.json").write_text(json.dumps(OPS))
    assert dispatcher.reload_handlers() == len(OPS["handlers"])
    dispatcher.handle(request("h13", "ops", "greet", {"name": "y"}))
    assert context.wait_for(1)[0]["result"] == "hello y\n"
