"""End to end: the real agent, mosquitto, Redis, SQLite and the reference API.

The API is driven over HTTP and WebSocket as the cloud team's clients would.
"""

import asyncio
import json
import os
import sqlite3

import aiohttp
import pytest
import redis as redis_client

from harness import HostRouter, RefApi, wait_until

ROUTER_ID = "e2e-router"


@pytest.fixture(scope="module")
def stack(mosquitto, redis_server, tmp_path_factory):
    """One reference API and one agent for the whole module."""
    workdir = tmp_path_factory.mktemp("e2e")
    api = RefApi(workdir, mosquitto.port, redis_server.port, instance_id="e2e-api-1").start()
    router = HostRouter(workdir / "router", ROUTER_ID, [mosquitto.port],
                        options={"metrics_interval": "10", "rpc_max_concurrent": "2",
                                 "tunnel_max_sessions": "3", "tunnel_idle_timeout": "600"})
    router.add_handler_file("uname.json", {"handlers": [
        {"path": "ops", "method": "uname", "command": ["uname", "{args.flag}"], "timeout": 5}]})
    router.start()
    try:
        wait_until(lambda: api.request("GET", "/routers/" + ROUTER_ID)[1].get("status") == "online", 20,
                   interval=0.1, message="router online in the API")
        yield api, router
    finally:
        router.stop()
        api.stop()


def test_heartbeat_keys_in_redis(stack, redis_server):
    api, router = stack
    client = redis_client.Redis(port=redis_server.port)
    try:
        wait_until(lambda: client.exists("router:heartbeat:%s" % ROUTER_ID), 15,
                   message="heartbeat key")
        ttl = client.ttl("router:heartbeat:%s" % ROUTER_ID)
        online = client.get("router:online:%s" % ROUTER_ID)
    finally:
        client.close()

    assert ttl >= 2 * 10
    assert online is not None


def test_nas_row_after_online(stack):
    api, router = stack
    connection = sqlite3.connect(api.database_path)
    try:
        rows = connection.execute(
            "SELECT nasname, shortname, type, secret FROM nas WHERE nasname = ?", (ROUTER_ID,)).fetchall()
    finally:
        connection.close()

    assert len(rows) == 1
    nasname, shortname, nas_type, secret = rows[0]
    assert nasname == ROUTER_ID
    assert shortname == ROUTER_ID[:30]
    assert nas_type == "other"
    assert len(secret) >= 16


def test_router_report_has_metrics(stack):
    api, router = stack
    status, body = wait_until(
        lambda: (lambda reply: reply if reply[1].get("metrics") else None)(
            api.request("GET", "/routers/" + ROUTER_ID)), 15, message="metrics in the API")

    assert status == 200
    assert body["status"] == "online"
    assert "uptime" in body["metrics"]


def test_rpc_agent_ping(stack):
    api, router = stack
    status, body = api.rpc(ROUTER_ID, "spotfi.agent", "ping")

    assert status == 200
    assert body["status"] == "success"
    assert body["result"]["pong"] is True


def test_rpc_ubus_success(stack):
    api, router = stack
    status, body = api.rpc(ROUTER_ID, "system", "board")

    assert status == 200
    assert isinstance(body["result"], dict)


def test_rpc_ubus_failure_is_502(stack):
    api, router = stack
    status, body = api.rpc(ROUTER_ID, "test", "fail")

    assert status == 502
    assert "Not found" in json.dumps(body)


def test_rpc_operator_handler(stack):
    api, router = stack
    status, body = api.rpc(ROUTER_ID, "ops", "uname", {"flag": "-s"})

    assert status == 200
    assert body["result"].strip() == os.uname().sysname


def test_rpc_timeout_is_reported(stack):
    api, router = stack
    status, body = api.rpc(ROUTER_ID, "test", "sleep", {"seconds": 5}, timeout=1)

    assert status in (502, 504)
    assert "timeout" in json.dumps(body)


def test_rpc_truncated_output(stack):
    api, router = stack
    status, body = api.rpc(ROUTER_ID, "test", "big", {"bytes": 400000})

    assert status == 200
    assert body.get("truncated") is True


def test_rpc_unknown_router_is_404(stack):
    api, router = stack
    status, body = api.rpc("no-such-router", "spotfi.agent", "ping", timeout=2)

    assert status == 404


async def _terminal(api_url, commands, cols=80, rows=24, until=None, timeout=30.0):
    """Open WS /x, send each command, return (output bytes, control messages)."""
    output = bytearray()
    controls = []
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect("%s/x?routerId=%s&cols=%d&rows=%d"
                                      % (api_url, ROUTER_ID, cols, rows)) as ws:
            async def reader():
                async for message in ws:
                    if message.type == aiohttp.WSMsgType.BINARY:
                        output.extend(message.data)
                        if until is not None and until(bytes(output)):
                            return
                    elif message.type == aiohttp.WSMsgType.TEXT:
                        controls.append(json.loads(message.data))
                        if controls[-1].get("type") in ("exit", "error"):
                            return

            task = asyncio.ensure_future(reader())
            for command in commands:
                if isinstance(command, dict):
                    await ws.send_str(json.dumps(command))
                else:
                    await ws.send_bytes(command)
                await asyncio.sleep(0.1)
            await asyncio.wait_for(task, timeout)
    return bytes(output), controls


def test_terminal_runs_echo(stack):
    api, router = stack
    output, controls = asyncio.run(_terminal(
        api.url, [b"echo hello-$((6*7))\n"], until=lambda data: b"hello-42" in data))

    assert b"hello-42" in output


def test_terminal_resize_seen_by_stty(stack):
    api, router = stack
    output, controls = asyncio.run(_terminal(
        api.url, [{"type": "resize", "cols": 132, "rows": 43}, b"stty size\n"],
        until=lambda data: b"43 132" in data))

    assert b"43 132" in output


def test_terminal_megabyte_in_order(stack):
    api, router = stack
    command = b"i=0; while [ $i -lt 20000 ]; do echo \"line-$i-abcdefghijklmnopqrstuvwxyz0123456789\"; i=$((i+1)); done; echo END-OF-TEST\n"
    output, controls = asyncio.run(_terminal(
        api.url, [b"stty -echo\n", command], until=lambda data: b"\nEND-OF-TEST" in data,
        timeout=120))
    # The shell prompt may stand before the first line, so each line is taken from "line-" on.
    lines = [line[line.index("line-"):] for line in output.decode().replace("\r", "").split("\n")
             if "line-" in line]

    assert len(lines) == 20000
    assert lines == ["line-%d-abcdefghijklmnopqrstuvwxyz0123456789" % i for i in range(20000)]


def test_terminal_two_sessions_at_once(stack):
    api, router = stack

    async def both():
        return await asyncio.gather(
            _terminal(api.url, [b"echo first-$((1+1))\n"], until=lambda data: b"first-2" in data),
            _terminal(api.url, [b"echo second-$((2+2))\n"], until=lambda data: b"second-4" in data))

    (first, _), (second, _) = asyncio.run(both())

    assert b"first-2" in first
    assert b"second-4" in second
    assert b"second-4" not in first


def test_two_api_instances_both_complete_rpc(stack, mosquitto, redis_server, tmp_path):
    api, router = stack
    second = RefApi(tmp_path, mosquitto.port, redis_server.port, instance_id="e2e-api-2",
                    database_url="sqlite:///" + api.database_path).start()
    try:
        results = [instance.rpc(ROUTER_ID, "spotfi.agent", "ping") for instance in (api, second)
                   for _ in range(3)]
    finally:
        second.stop()

    assert [status for status, body in results] == [200] * 6
    assert all(body["status"] == "success" for status, body in results)


def _children(pid):
    """Return [(child pid, state letter)] of process `pid`, read from /proc."""
    children = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name) as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append((int(name), fields[0]))
    return children


def test_terminal_cycles_leave_no_zombies(stack):
    api, router = stack
    fds_before = len(os.listdir("/proc/%d/fd" % router.pid))

    for cycle in range(20):
        output, _ = asyncio.run(_terminal(
            api.url, [b"echo cycle-%d\n" % cycle], until=lambda data, c=cycle: b"cycle-%d" % c in data))
        assert b"cycle-%d" % cycle in output

    wait_until(lambda: not _children(router.pid), 15, message="agent children reaped")
    fds_after = len(os.listdir("/proc/%d/fd" % router.pid))

    assert fds_after <= fds_before
