"""End to end: the real agent, mosquitto, Redis, SQLite and the reference API.

The API is driven over HTTP and WebSocket as the cloud team's clients would.
Every case runs twice: against the agent as a process of this host, and
against the agent installed from its ipk in the QEMU stand-in router
(tests/routers.py), where the commands and shells run in the guest.
"""

import asyncio
import json
import os
import re
import sqlite3

import pytest
import redis as redis_client

from harness import RefApi, terminal_session, wait_until
from routers import ROUTER_KINDS, make_router

ROUTER_IDS = {"host": "e2e-router", "qemu": "e2e-qemu-router"}
# An agent in the guest first boots QEMU (emulated without KVM on some hosts).
ONLINE_TIMEOUTS = {"host": 20, "qemu": 60}


@pytest.fixture(scope="module", params=ROUTER_KINDS)
def stack(request, mosquitto, redis_server, tmp_path_factory):
    """One reference API and one agent for the whole module, per router kind."""
    kind = request.param
    router_id = ROUTER_IDS[kind]
    workdir = tmp_path_factory.mktemp("e2e-%s" % kind)
    router = make_router(kind, workdir / "router", router_id, mosquitto.port,
                         options={"metrics_interval": "10", "rpc_max_concurrent": "2",
                                  "tunnel_max_sessions": "3", "tunnel_idle_timeout": "600"})
    router.add_handler_file("uname.json", {"handlers": [
        {"path": "ops", "method": "uname", "command": ["uname", "{args.flag}"], "timeout": 5}]})
    api = RefApi(workdir, mosquitto.port, redis_server.port,
                 instance_id="e2e-api-1-%s" % kind).start()
    try:
        router.start()
        wait_until(lambda: api.request("GET", "/routers/" + router_id)[1].get("status") == "online",
                   ONLINE_TIMEOUTS[kind], interval=0.1, message="router online in the API")
        yield api, router
    finally:
        router.close()
        api.stop()


@pytest.fixture
def ubus(stack):
    """The ubus test double as the router's `ubus` for one test."""
    api, router = stack
    with router.ubus_test_double():
        yield


def test_heartbeat_keys_in_redis(stack, redis_server):
    api, router = stack
    client = redis_client.Redis(port=redis_server.port)
    try:
        wait_until(lambda: client.exists("router:heartbeat:%s" % router.router_id), 15,
                   message="heartbeat key")
        ttl = client.ttl("router:heartbeat:%s" % router.router_id)
        online = client.get("router:online:%s" % router.router_id)
    finally:
        client.close()

    assert ttl >= 2 * 10
    assert online is not None


def test_nas_row_after_online(stack):
    api, router = stack
    connection = sqlite3.connect(api.database_path)
    try:
        rows = connection.execute(
            "SELECT nasname, shortname, type, secret FROM nas WHERE nasname = ?",
            (router.router_id,)).fetchall()
    finally:
        connection.close()

    assert len(rows) == 1
    nasname, shortname, nas_type, secret = rows[0]
    assert nasname == router.router_id
    assert shortname == router.router_id[:30]
    assert nas_type == "other"
    assert len(secret) >= 16


def test_router_report_has_metrics(stack):
    api, router = stack
    status, body = wait_until(
        lambda: (lambda reply: reply if reply[1].get("metrics") else None)(
            api.request("GET", "/routers/" + router.router_id)), 15, message="metrics in the API")

    assert status == 200
    assert body["status"] == "online"
    assert "uptime" in body["metrics"]


def test_rpc_agent_ping(stack):
    api, router = stack
    status, body = api.rpc(router.router_id, "spotfi.agent", "ping")

    assert status == 200
    assert body["status"] == "success"
    assert body["result"]["pong"] is True


def test_rpc_ubus_success(stack, ubus):
    api, router = stack
    status, body = api.rpc(router.router_id, "system", "board")

    assert status == 200
    assert isinstance(body["result"], dict)


def test_rpc_ubus_failure_is_502(stack, ubus):
    api, router = stack
    status, body = api.rpc(router.router_id, "test", "fail")

    assert status == 502
    assert "Not found" in json.dumps(body)


def test_rpc_operator_handler(stack):
    api, router = stack
    status, body = api.rpc(router.router_id, "ops", "uname", {"flag": "-s"})

    assert status == 200
    assert body["result"].strip() == router.shell("uname -s").strip()
    if router.kind == "host":
        assert body["result"].strip() == os.uname().sysname


def test_rpc_operator_handler_runs_on_router(stack):
    api, router = stack
    status, body = api.rpc(router.router_id, "ops", "uname", {"flag": "-n"})

    assert status == 200
    assert body["result"].strip() == router.shell("uname -n").strip()


def test_rpc_timeout_is_reported(stack, ubus):
    api, router = stack
    status, body = api.rpc(router.router_id, "test", "sleep", {"seconds": 5}, timeout=1)

    assert status in (502, 504)
    assert "timeout" in json.dumps(body)


def test_rpc_truncated_output(stack, ubus):
    api, router = stack
    status, body = api.rpc(router.router_id, "test", "big", {"bytes": 400000})

    assert status == 200
    assert body.get("truncated") is True


def test_rpc_unknown_router_is_404(stack):
    api, router = stack
    status, body = api.rpc("no-such-router", "spotfi.agent", "ping", timeout=2)

    assert status == 404


def _terminal(api, router, commands, **options):
    """Run one terminal session to the router through WS /x; return (output, control messages)."""
    return asyncio.run(terminal_session(api.url, router.router_id, commands, **options))


def test_terminal_runs_echo(stack):
    api, router = stack
    output, controls = _terminal(api, router, [b"echo hello-$((6*7))\n"],
                                 until=lambda data: b"hello-42" in data)

    assert b"hello-42" in output


def test_terminal_resize_seen_by_stty(stack):
    api, router = stack
    output, controls = _terminal(api, router,
                                 [{"type": "resize", "cols": 132, "rows": 43}, b"stty size\n"],
                                 until=lambda data: b"43 132" in data)

    assert b"43 132" in output


def test_terminal_megabyte_in_order(stack):
    api, router = stack
    command = b"i=0; while [ $i -lt 20000 ]; do echo \"line-$i-abcdefghijklmnopqrstuvwxyz0123456789\"; i=$((i+1)); done; echo END-OF-TEST\n"
    output, controls = _terminal(api, router, [b"stty -echo\n", command],
                                 until=lambda data: b"\nEND-OF-TEST" in data, timeout=120)
    # The shell prompt may stand before the first line, so each line is taken from "line-" on.
    # A slow router's shell runs `stty -echo` after the terminal has echoed
    # the loop's command line, whose "line-$i-" must not count as output.
    numbered = re.compile(r"line-[0-9]+-")
    lines = []
    for line in output.decode().replace("\r", "").split("\n"):
        match = numbered.search(line)
        if match:
            lines.append(line[match.start():])

    assert len(lines) == 20000
    assert lines == ["line-%d-abcdefghijklmnopqrstuvwxyz0123456789" % i for i in range(20000)]


def test_terminal_two_sessions_at_once(stack):
    api, router = stack

    async def both():
        return await asyncio.gather(
            terminal_session(api.url, router.router_id, [b"echo first-$((1+1))\n"],
                             until=lambda data: b"first-2" in data),
            terminal_session(api.url, router.router_id, [b"echo second-$((2+2))\n"],
                             until=lambda data: b"second-4" in data))

    (first, _), (second, _) = asyncio.run(both())

    assert b"first-2" in first
    assert b"second-4" in second
    assert b"second-4" not in first


def test_two_api_instances_both_complete_rpc(stack, mosquitto, redis_server, tmp_path):
    api, router = stack
    second = RefApi(tmp_path, mosquitto.port, redis_server.port,
                    instance_id="e2e-api-2-%s" % router.kind,
                    database_url="sqlite:///" + api.database_path).start()
    try:
        results = [instance.rpc(router.router_id, "spotfi.agent", "ping")
                   for instance in (api, second) for _ in range(3)]
    finally:
        second.stop()

    assert [status for status, body in results] == [200] * 6
    assert all(body["status"] == "success" for status, body in results)


def test_terminal_cycles_leave_no_zombies(stack):
    api, router = stack
    pid = router.agent_pid()
    fds_before = router.open_fd_count(pid)

    for cycle in range(20):
        output, _ = _terminal(api, router, [b"echo cycle-%d\n" % cycle],
                              until=lambda data, c=cycle: b"cycle-%d" % c in data)
        assert b"cycle-%d" % cycle in output

    wait_until(lambda: not router.child_processes(pid), 15, interval=0.2,
               message="agent children reaped")
    fds_after = router.open_fd_count(pid)

    assert fds_after <= fds_before
