"""Terminal sessions (x-tunnel) on a real PTY with a real /bin/sh.

The MQTT session is replaced by CollectingContext, which records what the
tunnel publishes; the loop, the PTYs and the shells are real.
"""

import binascii
import json
import os
import re
import time

import pytest

from spotfi_agent import tunnel as tunnel_module
from spotfi_agent.loop import Loop
from spotfi_agent.topics import Topics
from spotfi_agent.tunnel import TunnelManager

ROUTER_ID = "router-under-test"
SHELL = "/bin/sh"


class TunnelSettings:
    def __init__(self, **overrides):
        self.tunnel = True
        self.tunnel_shell = SHELL
        self.tunnel_max_sessions = 4
        self.tunnel_idle_timeout = 1800
        self.root = "/"
        for name, value in overrides.items():
            setattr(self, name, value)


class CollectingContext:
    """The agent context the tunnel uses, with publish() appending to `sent`."""

    def __init__(self, **settings):
        self.loop = Loop()
        self.router_id = ROUTER_ID
        self.topics = Topics(ROUTER_ID)
        self.settings = TunnelSettings(**settings)
        self.sent = []
        self.outgoing_bytes = 0

    def publish(self, topic, payload, qos=0, retain=False):
        self.sent.append((topic, payload, qos, retain))
        return True


def run_until(context, condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        context.loop.run_once(0.05)
    return condition()


def run_for(context, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        context.loop.run_once(0.05)


def send(manager, **message):
    manager.handle(json.dumps(message).encode())


def type_text(manager, session_id, text):
    data = binascii.b2a_base64(text.encode(), newline=False).decode()
    send(manager, type="x-data", sessionId=session_id, data=data)


def replies(context, session_id=None, kind=None):
    found = []
    for topic, payload, qos, retain in context.sent:
        message = json.loads(payload)
        if session_id is not None and message.get("sessionId") != session_id:
            continue
        if kind is not None and message.get("type") != kind:
            continue
        found.append(message)
    return found


def output(context, session_id):
    return b"".join(binascii.a2b_base64(message["data"])
                    for message in replies(context, session_id, "x-data"))


def start_session(context, manager, session_id, **extra):
    send(manager, type="x-start", sessionId=session_id, **extra)
    started = replies(context, session_id, "x-started")
    assert started, replies(context, session_id)
    return started[0]


def is_reaped(pid):
    """Return True when `pid` is no longer a child of this process.

    WNOWAIT looks at a zombie without reaping it, so the tunnel still gets its status.
    """
    try:
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return False


def is_gone(pid):
    """Return True when `pid` no longer runs: gone, or a zombie that init has not reaped yet."""
    try:
        with open("/proc/%d/stat" % pid) as handle:
            stat = handle.read()
    except FileNotFoundError:
        return True
    return stat[stat.rfind(")") + 2] == "Z"


def wait_for_output(context, manager, session_id, pattern, timeout=10.0):
    regex = re.compile(pattern)
    run_until(context, lambda: regex.search(output(context, session_id)), timeout)
    return regex.search(output(context, session_id))


@pytest.fixture
def make_tunnel():
    """Return a factory of (context, manager); every session is closed and reaped after the test."""
    created = []

    def factory(**settings):
        context = CollectingContext(**settings)
        manager = TunnelManager(context)
        created.append((context, manager))
        return context, manager

    yield factory
    for context, manager in created:
        manager.close_all("shutdown")
        run_until(context, lambda: manager.ending_count == 0, 10.0)
        assert manager.session_count == 0
        assert manager.ending_count == 0


def test_tunnel_start_replies_started(make_tunnel):
    context, manager = make_tunnel()

    started = start_session(context, manager, "s1")

    assert started == {"type": "x-started", "sessionId": "s1", "pid": started["pid"],
                       "cols": 80, "rows": 24}
    assert isinstance(started["pid"], int)
    topic, payload, qos, retain = context.sent[0]
    assert topic == context.topics.x_out
    assert qos == 0
    assert retain is False
    assert manager.session_count == 1


def test_tunnel_echo_output(make_tunnel):
    context, manager = make_tunnel()
    start_session(context, manager, "s1")

    type_text(manager, "s1", "echo \"HEL\"\"LO-$((6*7))\"\n")

    assert wait_for_output(context, manager, "s1", rb"HELLO-42")


def test_tunnel_shell_environment_and_terminal(make_tunnel):
    context, manager = make_tunnel()
    start_session(context, manager, "s1")

    type_text(manager, "s1", "echo \"T=$TERM\"; echo \"S=$SHELL\"; [ -t 0 ] && echo TTY\"OK\"\n")

    match = wait_for_output(context, manager, "s1", rb"T=(\S+)\r\nS=(\S+)\r\nTTYOK")
    assert match
    assert match.group(1) == b"xterm-256color"
    assert match.group(2) == SHELL.encode()


def test_tunnel_shell_owns_controlling_terminal(make_tunnel):
    context, manager = make_tunnel()
    started = start_session(context, manager, "s1")

    # The session id of a process is field 6 of /proc/<pid>/stat; the shell
    # leads its own session, so both numbers are its pid.
    type_text(manager, "s1", "echo SID=$(cut -d' ' -f6 /proc/$$/stat) PID=$$\n")

    match = wait_for_output(context, manager, "s1", rb"SID=(\d+) PID=(\d+)")
    assert match
    assert int(match.group(1)) == started["pid"]
    assert int(match.group(2)) == started["pid"]


def test_tunnel_resize_seen_by_stty(make_tunnel):
    context, manager = make_tunnel()
    started = start_session(context, manager, "s1", cols=100, rows=30)
    assert (started["cols"], started["rows"]) == (100, 30)

    type_text(manager, "s1", "echo SIZE1=$(stty size)\n")
    first = wait_for_output(context, manager, "s1", rb"SIZE1=(\d+ \d+)")
    assert first
    assert first.group(1) == b"30 100"

    send(manager, type="x-resize", sessionId="s1", cols=132, rows=43)
    type_text(manager, "s1", "echo SIZE2=$(stty size)\n")
    second = wait_for_output(context, manager, "s1", rb"SIZE2=(\d+ \d+)")
    assert second
    assert second.group(1) == b"43 132"
    assert replies(context, "s1", "x-error") == []


def test_tunnel_large_output_complete_in_order(make_tunnel):
    context, manager = make_tunnel()
    start_session(context, manager, "s1")
    count = 150000
    expected = b"".join(b"%d\r\n" % number for number in range(1, count + 1))
    assert len(expected) > 1000000

    type_text(manager, "s1", "stty -echo; seq 1 %d; echo \"DO\"\"NE\"\n" % count)

    assert wait_for_output(context, manager, "s1", rb"DONE\r\n", timeout=30.0)
    data = output(context, "s1")
    start = data.index(b"1\r\n2\r\n3\r\n")
    assert data[start:start + len(expected)] == expected
    seqs = [message["seq"] for message in replies(context, "s1", "x-data")]
    assert seqs == list(range(len(seqs)))
    assert len(seqs) > 1


def test_tunnel_output_batches_bounded(make_tunnel):
    context, manager = make_tunnel()
    start_session(context, manager, "s1")

    type_text(manager, "s1", "stty -echo; head -c 300000 /dev/zero; echo \"DO\"\"NE\"\n")

    assert wait_for_output(context, manager, "s1", rb"DONE", timeout=30.0)
    sizes = [len(binascii.a2b_base64(message["data"]))
             for message in replies(context, "s1", "x-data")]
    assert max(sizes) < tunnel_module.BATCH_SIZE + tunnel_module.READ_SIZE
    # 300 KB at up to 32 KiB a message: batching must join the PTY's small reads.
    assert len(sizes) < 200


def test_tunnel_utf8_multibyte_intact(make_tunnel):
    context, manager = make_tunnel()
    start_session(context, manager, "s1")
    lines = 100000

    # "€ж" is 5 bytes, so reads of any size split characters again and again.
    type_text(manager, "s1", "stty -echo; yes '€ж' | head -n %d; echo \"DO\"\"NE\"\n" % lines)

    assert wait_for_output(context, manager, "s1", rb"DONE", timeout=30.0)
    text = output(context, "s1").decode("utf-8")
    assert text.count("€ж\r\n") == lines
    assert "\ufffd" not in text


def test_tunnel_sessions_independent(make_tunnel):
    context, manager = make_tunnel()
    first = start_session(context, manager, "one")
    second = start_session(context, manager, "two")
    assert first["pid"] != second["pid"]

    type_text(manager, "one", "echo \"FIR\"\"ST\"\n")
    type_text(manager, "two", "echo \"SEC\"\"OND\"\n")
    assert wait_for_output(context, manager, "one", rb"FIRST")
    assert wait_for_output(context, manager, "two", rb"SECOND")
    assert b"SECOND" not in output(context, "one")
    assert b"FIRST" not in output(context, "two")

    send(manager, type="x-stop", sessionId="one")
    type_text(manager, "two", "echo \"STI\"\"LL\"\n")
    assert wait_for_output(context, manager, "two", rb"STILL")
    assert replies(context, "two", "x-exit") == []
    assert manager.session_count == 1


def test_tunnel_limit_keeps_existing_sessions(make_tunnel):
    context, manager = make_tunnel(tunnel_max_sessions=2)
    start_session(context, manager, "a")
    start_session(context, manager, "b")

    send(manager, type="x-start", sessionId="c")

    errors = replies(context, "c", "x-error")
    assert len(errors) == 1
    assert errors[0]["code"] == "limit"
    assert "tunnel_max_sessions" in errors[0]["error"]
    assert replies(context, "c", "x-started") == []
    assert manager.session_count == 2
    for session_id in ("a", "b"):
        type_text(manager, session_id, "echo \"ALI\"\"VE\"\n")
        assert wait_for_output(context, manager, session_id, rb"ALIVE")
        assert replies(context, session_id, "x-exit") == []


def test_tunnel_idle_timeout_reaps(make_tunnel):
    context, manager = make_tunnel(tunnel_idle_timeout=1)
    started = start_session(context, manager, "s1")

    assert run_until(context, lambda: replies(context, "s1", "x-exit"), 15.0)

    exits = replies(context, "s1", "x-exit")
    assert exits[0]["reason"] == "idle"
    assert run_until(context, lambda: is_reaped(started["pid"]))
    assert manager.session_count == 0


def test_tunnel_idle_timeout_counts_input(make_tunnel):
    context, manager = make_tunnel(tunnel_idle_timeout=2)
    start_session(context, manager, "s1")

    for _ in range(6):
        run_for(context, 0.5)
        type_text(manager, "s1", ":\n")

    assert replies(context, "s1", "x-exit") == []


def test_tunnel_stop_kills_background_job(make_tunnel, monkeypatch):
    # With SIGKILL out of reach, only the hang-up can end the job in time.
    monkeypatch.setattr(tunnel_module, "KILL_GRACE", 60.0)
    context, manager = make_tunnel()
    started = start_session(context, manager, "s1")
    type_text(manager, "s1", "sleep 100 & echo BG=$!\n")
    match = wait_for_output(context, manager, "s1", rb"BG=(\d+)")
    assert match
    background = int(match.group(1))
    assert not is_gone(background)

    send(manager, type="x-stop", sessionId="s1")

    exits = replies(context, "s1", "x-exit")
    assert len(exits) == 1
    assert exits[0]["reason"] == "stopped"
    assert manager.session_count == 0
    assert run_until(context, lambda: is_gone(background))
    assert run_until(context, lambda: is_reaped(started["pid"]))


def test_tunnel_stop_kills_job_ignoring_hangup(make_tunnel):
    context, manager = make_tunnel()
    start_session(context, manager, "s1")
    type_text(manager, "s1", "(trap '' HUP; sleep 100) & echo BG=$!\n")
    match = wait_for_output(context, manager, "s1", rb"BG=(\d+)")
    assert match
    background = int(match.group(1))

    send(manager, type="x-stop", sessionId="s1")

    # SIGKILL follows SIGHUP after KILL_GRACE seconds.
    assert run_until(context, lambda: is_gone(background), tunnel_module.KILL_GRACE + 5.0)


def test_tunnel_open_close_cycles_leak_nothing(make_tunnel):
    context, manager = make_tunnel()
    fds_before = len(os.listdir("/proc/self/fd"))
    pids = []

    for cycle in range(20):
        session_id = "cycle-%d" % cycle
        started = start_session(context, manager, session_id)
        pids.append(started["pid"])
        type_text(manager, session_id, "echo \"UP\"\"%d\"\n" % cycle)
        assert wait_for_output(context, manager, session_id, rb"UP%d" % cycle)
        if cycle % 2:
            send(manager, type="x-stop", sessionId=session_id)
        else:
            type_text(manager, session_id, "exit\n")
        assert run_until(context, lambda: replies(context, session_id, "x-exit"))
        assert run_until(context, lambda: manager.ending_count == 0)

    assert manager.session_count == 0
    assert all(is_reaped(pid) for pid in pids)
    assert len(os.listdir("/proc/self/fd")) == fds_before


def test_tunnel_shell_exit_sends_exit_code(make_tunnel):
    context, manager = make_tunnel()
    started = start_session(context, manager, "s1")

    type_text(manager, "s1", "echo \"BY\"\"E\"; exit 7\n")

    assert run_until(context, lambda: replies(context, "s1", "x-exit"))
    exits = replies(context, "s1", "x-exit")
    assert exits == [{"type": "x-exit", "sessionId": "s1", "reason": "exit", "exitCode": 7}]
    assert b"BYE" in output(context, "s1")
    # x-exit comes after the last output.
    kinds = [message["type"] for message in replies(context, "s1")]
    assert kinds[-1] == "x-exit"
    assert is_reaped(started["pid"])
    assert manager.session_count == 0


def test_tunnel_shell_exit_with_background_job(make_tunnel):
    context, manager = make_tunnel()
    start_session(context, manager, "s1")
    type_text(manager, "s1", "sleep 100 & echo BG=$!\n")
    match = wait_for_output(context, manager, "s1", rb"BG=(\d+)")
    assert match

    # The job keeps the terminal open, so only the exit check notices the shell's end.
    type_text(manager, "s1", "exit 4\n")

    assert run_until(context, lambda: replies(context, "s1", "x-exit"), 15.0)
    assert replies(context, "s1", "x-exit")[0]["exitCode"] == 4
    assert run_until(context, lambda: is_gone(int(match.group(1))))


def test_tunnel_shell_killed_by_signal(make_tunnel):
    context, manager = make_tunnel()
    start_session(context, manager, "s1")

    type_text(manager, "s1", "kill -9 $$\n")

    assert run_until(context, lambda: replies(context, "s1", "x-exit"))
    assert replies(context, "s1", "x-exit")[0]["exitCode"] == 128 + 9


def test_tunnel_large_input_not_blocking(make_tunnel):
    context, manager = make_tunnel()
    start_session(context, manager, "s1")
    type_text(manager, "s1", "stty raw -echo; head -c 300000 | wc -c\n")
    run_for(context, 0.5)

    # More than the PTY buffers at once, so part of it waits for the writer.
    send(manager, type="x-data", sessionId="s1",
         data=binascii.b2a_base64(b"x" * 300000, newline=False).decode())

    assert wait_for_output(context, manager, "s1", rb"300000", timeout=20.0)
    assert replies(context, "s1", "x-error") == []


def test_tunnel_input_over_limit_rejected(make_tunnel, monkeypatch):
    monkeypatch.setattr(tunnel_module, "MAX_PENDING_INPUT", 100000)
    context, manager = make_tunnel()
    start_session(context, manager, "s1")
    # The shell sleeps, so nothing reads the terminal's input.
    type_text(manager, "s1", "stty raw -echo; sleep 5\n")
    run_for(context, 0.5)
    chunk = binascii.b2a_base64(b"y" * 60000, newline=False).decode()

    for _ in range(4):
        send(manager, type="x-data", sessionId="s1", data=chunk)

    errors = replies(context, "s1", "x-error")
    assert errors
    assert errors[0]["code"] == "limit"
    assert "input" in errors[0]["error"]


def test_tunnel_backpressure_pauses_and_resumes(make_tunnel):
    context, manager = make_tunnel()
    start_session(context, manager, "s1")
    type_text(manager, "s1", "stty -echo\n")
    run_for(context, 0.5)
    sent_before = len(replies(context, "s1", "x-data"))

    context.outgoing_bytes = tunnel_module.OUTGOING_LIMIT + 1
    type_text(manager, "s1", "seq 1 50000; echo \"DO\"\"NE\"\n")
    run_for(context, 1.0)
    assert len(replies(context, "s1", "x-data")) == sent_before

    context.outgoing_bytes = 0
    assert wait_for_output(context, manager, "s1", rb"DONE", timeout=20.0)
    expected = b"".join(b"%d\r\n" % number for number in range(1, 50001))
    assert expected in output(context, "s1")


@pytest.mark.parametrize("payload, code", [
    (b"{not json", "invalid_request"),
    (b"\xff\xfe", "invalid_request"),
    (b"[1, 2]", "invalid_request"),
    (b'{"type": "x-start"}', "invalid_request"),
    (b'{"type": "x-start", "sessionId": 5}', "invalid_request"),
    (b'{"type": "x-start", "sessionId": ""}', "invalid_request"),
    (b'{"type": "x-start", "sessionId": "%s"}' % (b"x" * 201), "invalid_request"),
    (b'{"sessionId": "s9"}', "invalid_request"),
    (b'{"type": "x-bogus", "sessionId": "s9"}', "invalid_request"),
    (b'{"type": "x-start", "sessionId": "s9", "cols": 0}', "invalid_request"),
    (b'{"type": "x-start", "sessionId": "s9", "rows": 1001}', "invalid_request"),
    (b'{"type": "x-start", "sessionId": "s9", "cols": "80"}', "invalid_request"),
    (b'{"type": "x-start", "sessionId": "s9", "cols": true}', "invalid_request"),
    (b'{"type": "x-start", "sessionId": "s9", "cols": 80.5}', "invalid_request"),
    (b'{"type": "x-data", "sessionId": "nope", "data": "aGk="}', "unknown_session"),
    (b'{"type": "x-resize", "sessionId": "nope", "cols": 80, "rows": 24}', "unknown_session"),
    (b'{"type": "x-stop", "sessionId": "nope"}', "unknown_session"),
])
def test_tunnel_invalid_message_rejected(make_tunnel, payload, code):
    context, manager = make_tunnel()

    manager.handle(payload)

    assert len(context.sent) == 1
    topic, reply, qos, retain = context.sent[0]
    message = json.loads(reply)
    assert topic == context.topics.x_out
    assert message["type"] == "x-error"
    assert message["code"] == code
    assert message["error"]
    assert manager.session_count == 0


@pytest.mark.parametrize("fields", [
    {"type": "x-data"},
    {"type": "x-data", "data": 5},
    {"type": "x-data", "data": "not base64!"},
    {"type": "x-data", "data": "aGk=aGk=x"},
    {"type": "x-data", "data": "€€€€"},
    {"type": "x-resize", "cols": 80},
    {"type": "x-resize", "cols": 0, "rows": 24},
    {"type": "x-resize", "cols": 80, "rows": -1},
    {"type": "x-start"},
])
def test_tunnel_invalid_session_message_rejected(make_tunnel, fields):
    context, manager = make_tunnel()
    start_session(context, manager, "s1")

    send(manager, sessionId="s1", **fields)

    errors = replies(context, "s1", "x-error")
    assert len(errors) == 1
    assert errors[0]["code"] == "invalid_request"
    assert len(replies(context, "s1", "x-started")) == 1
    assert manager.session_count == 1


def test_tunnel_unpadded_base64_accepted(make_tunnel):
    context, manager = make_tunnel()
    start_session(context, manager, "s1")

    # "echo PAD\"\"OK\n" without its "=" padding.
    data = binascii.b2a_base64(b"echo PAD\"\"OK\n", newline=False).decode().rstrip("=")
    send(manager, type="x-data", sessionId="s1", data=data)

    assert wait_for_output(context, manager, "s1", rb"PADOK")
    assert replies(context, "s1", "x-error") == []


def test_tunnel_disabled_rejects_start(make_tunnel):
    context, manager = make_tunnel(tunnel=False)

    send(manager, type="x-start", sessionId="s1")
    send(manager, type="x-data", sessionId="s1", data="aGk=")

    errors = replies(context, "s1", "x-error")
    assert [error["code"] for error in errors] == ["disabled", "disabled"]
    assert "tunnel" in errors[0]["error"]
    assert manager.session_count == 0


def test_tunnel_zero_max_sessions_disables(make_tunnel):
    context, manager = make_tunnel(tunnel_max_sessions=0)

    send(manager, type="x-start", sessionId="s1")

    errors = replies(context, "s1", "x-error")
    assert len(errors) == 1
    assert errors[0]["code"] == "disabled"
    assert "tunnel_max_sessions" in errors[0]["error"]


def test_tunnel_missing_shell_spawn_failed(make_tunnel):
    context, manager = make_tunnel(tunnel_shell="/nonexistent/bin/shell")
    fds_before = len(os.listdir("/proc/self/fd"))

    send(manager, type="x-start", sessionId="s1")

    errors = replies(context, "s1", "x-error")
    assert len(errors) == 1
    assert errors[0]["code"] == "spawn_failed"
    assert "/nonexistent/bin/shell" in errors[0]["error"]
    assert "tunnel_shell" in errors[0]["error"]
    assert manager.session_count == 0
    assert len(os.listdir("/proc/self/fd")) == fds_before


def test_tunnel_unset_shell_spawn_failed(make_tunnel):
    context, manager = make_tunnel(tunnel_shell="")

    send(manager, type="x-start", sessionId="s1")

    errors = replies(context, "s1", "x-error")
    assert errors[0]["code"] == "spawn_failed"
    assert "tunnel_shell" in errors[0]["error"]


@pytest.mark.parametrize("response_topic, honoured", [
    ("spotfi/router/%s/x/out/api-1" % ROUTER_ID, True),
    ("spotfi/api/api-1/x/out", True),
    ("spotfi/router/other-router/x/out", False),
    ("elsewhere/x/out", False),
    ("spotfi/router/%s/x/#" % ROUTER_ID, False),
    ("spotfi/router/%s/x/in" % ROUTER_ID, False),
    (17, False),
])
def test_tunnel_response_topic(make_tunnel, response_topic, honoured):
    context, manager = make_tunnel()
    expected = response_topic if honoured else context.topics.x_out

    send(manager, type="x-start", sessionId="s1", responseTopic=response_topic)
    type_text(manager, "s1", "echo \"TO\"\"PIC\"; exit 0\n")

    assert run_until(context, lambda: replies(context, "s1", "x-exit"))
    topics = set(topic for topic, payload, qos, retain in context.sent)
    assert topics == {expected}
    assert all(qos == 0 for topic, payload, qos, retain in context.sent)
    assert b"TOPIC" in output(context, "s1")


def test_tunnel_error_uses_message_response_topic(make_tunnel):
    context, manager = make_tunnel()
    topic = "spotfi/router/%s/x/out/api-2" % ROUTER_ID

    send(manager, type="x-data", sessionId="nope", data="aGk=", responseTopic=topic)

    assert len(context.sent) == 1
    assert context.sent[0][0] == topic
    assert json.loads(context.sent[0][1])["code"] == "unknown_session"


def test_tunnel_session_error_uses_session_topic(make_tunnel):
    context, manager = make_tunnel()
    topic = "spotfi/router/%s/x/out/api-3" % ROUTER_ID
    start_session(context, manager, "s1", responseTopic=topic)

    send(manager, type="x-resize", sessionId="s1", cols=0, rows=0)

    assert context.sent[-1][0] == topic
    assert json.loads(context.sent[-1][1])["code"] == "invalid_request"


def test_tunnel_close_all_shutdown(make_tunnel):
    context, manager = make_tunnel()
    pids = [start_session(context, manager, name)["pid"] for name in ("a", "b")]

    manager.close_all("shutdown")

    for session_id in ("a", "b"):
        exits = replies(context, session_id, "x-exit")
        assert len(exits) == 1
        assert exits[0]["reason"] == "shutdown"
    assert manager.session_count == 0
    assert run_until(context, lambda: manager.ending_count == 0)
    assert all(is_reaped(pid) for pid in pids)


def test_tunnel_session_id_reusable_after_stop(make_tunnel):
    context, manager = make_tunnel()
    first = start_session(context, manager, "s1")
    send(manager, type="x-stop", sessionId="s1")

    send(manager, type="x-start", sessionId="s1")

    started = replies(context, "s1", "x-started")
    assert len(started) == 2
    assert started[1]["pid"] != first["pid"]
    assert manager.session_count == 1


def test_tunnel_invalid_executable_spawn_failed(make_tunnel, tmp_path):
    shell = tmp_path / "not-a-shell"
    shell.write_bytes(b"\x7fELF-but-not-really")
    shell.chmod(0o755)
    context, manager = make_tunnel(tunnel_shell=str(shell))

    send(manager, type="x-start", sessionId="s1")

    errors = replies(context, "s1", "x-error")
    assert len(errors) == 1
    assert errors[0]["code"] == "spawn_failed"
    assert str(shell) in errors[0]["error"]
    assert "tunnel_shell" in errors[0]["error"]
    assert manager.session_count == 0
