"""WebSocket terminal tests: /x bridged to a scripted router over MQTT."""

import asyncio
import json
import logging

import aiohttp
import pytest

from refapi_testing import WAIT, http_json, new_router_id, wait_until


def online_router(scripted_router, redis_client):
    router = scripted_router()
    router.online()
    wait_until(lambda: redis_client.exists("router:online:" + router.router_id),
               message="router %s online" % router.router_id)
    return router


def terminal_url(api, router_id, query=""):
    return "%s/x?routerId=%s%s" % (api.url.replace("http", "ws", 1), router_id, query)


async def receive_json(socket):
    frame = await socket.receive(timeout=WAIT)
    assert frame.type == aiohttp.WSMsgType.TEXT, frame
    return json.loads(frame.data)


async def receive_bytes(socket):
    frame = await socket.receive(timeout=WAIT)
    assert frame.type == aiohttp.WSMsgType.BINARY, frame
    return frame.data


def run_client(steps):
    """Run `await steps(session)` with an aiohttp ClientSession in a new event loop."""

    async def main():
        async with aiohttp.ClientSession() as session:
            return await steps(session)

    return asyncio.run(main())


def test_terminal_echo_resize_and_stop(start_refapi, scripted_router, redis_client):
    api = start_refapi()
    router = online_router(scripted_router, redis_client)

    async def steps(session):
        async with session.ws_connect(terminal_url(api, router.router_id,
                                                   "&cols=100&rows=40")) as socket:
            started = await receive_json(socket)
            await socket.send_bytes(b"echo hi\n")
            echoed = await receive_bytes(socket)
            await socket.send_json({"type": "resize", "cols": 120, "rows": 50})
            resized = await receive_bytes(socket)
            return started, echoed, resized

    started, echoed, resized = run_client(steps)
    assert started["type"] == "started"
    assert started["pid"] == 4242
    assert (started["cols"], started["rows"]) == (100, 40)
    assert echoed == b"echo hi\n"
    assert resized == b"resized 120x50"

    _, start = router.wait_for_message(lambda t, m: m.get("type") == "x-start")
    assert start["responseTopic"] == "spotfi/router/%s/x/out/%s" % (
        router.router_id, api.settings.instance_id)
    session_id = start["sessionId"]
    _, data = router.wait_for_message(lambda t, m: m.get("type") == "x-data")
    assert data["sessionId"] == session_id
    _, resize = router.wait_for_message(lambda t, m: m.get("type") == "x-resize")
    assert (resize["cols"], resize["rows"]) == (120, 50)
    _, stop = router.wait_for_message(lambda t, m: m.get("type") == "x-stop")
    assert stop["sessionId"] == session_id
    wait_until(lambda: len(api.service.terminals) == 0, message="session cleanup")


def test_terminal_orders_output_by_seq(start_refapi, scripted_router, redis_client):
    api = start_refapi()
    router = online_router(scripted_router, redis_client)
    router.echo_terminal = False

    async def steps(session):
        async with session.ws_connect(terminal_url(api, router.router_id)) as socket:
            start = await asyncio.to_thread(
                router.wait_for_message, lambda t, m: m.get("type") == "x-start")
            session_id = start[1]["sessionId"]
            reply_topic = start[1]["responseTopic"]
            router.send_terminal({"type": "x-started", "sessionId": session_id, "pid": 1,
                                  "cols": 80, "rows": 24}, reply_topic)
            assert (await receive_json(socket))["type"] == "started"
            for seq in (2, 0, 3, 1, 1):
                router.send_output(session_id, b"<%d>" % seq, seq, reply_topic)
            return [await receive_bytes(socket) for _ in range(4)]

    assert run_client(steps) == [b"<0>", b"<1>", b"<2>", b"<3>"]


def test_terminal_skips_lost_seq(start_refapi, scripted_router, redis_client, caplog):
    caplog.set_level(logging.WARNING)
    api = start_refapi()
    router = online_router(scripted_router, redis_client)
    router.echo_terminal = False

    async def steps(session):
        async with session.ws_connect(terminal_url(api, router.router_id)) as socket:
            _, start = await asyncio.to_thread(
                router.wait_for_message, lambda t, m: m.get("type") == "x-start")
            session_id = start["sessionId"]
            # The plain x/out topic works as well as the responseTopic.
            router.send_terminal({"type": "x-started", "sessionId": session_id, "pid": 1})
            assert (await receive_json(socket))["type"] == "started"
            router.send_output(session_id, b"a", 0)
            router.send_output(session_id, b"c", 2)
            received = [await receive_bytes(socket), await receive_bytes(socket)]
            return session_id, received

    session_id, received = run_client(steps)
    assert received == [b"a", b"c"]
    lost = [r.getMessage() for r in caplog.records if "was lost" in r.getMessage()]
    assert lost == ["session %s on router %s: terminal output seq 1 to 1 was lost"
                    % (session_id, router.router_id)]


def test_terminal_exit_closes_socket(start_refapi, scripted_router, redis_client):
    api = start_refapi()
    router = online_router(scripted_router, redis_client)
    router.echo_terminal = False

    async def steps(session):
        async with session.ws_connect(terminal_url(api, router.router_id)) as socket:
            _, start = await asyncio.to_thread(
                router.wait_for_message, lambda t, m: m.get("type") == "x-start")
            session_id = start["sessionId"]
            topic = start["responseTopic"]
            router.send_terminal({"type": "x-started", "sessionId": session_id, "pid": 1}, topic)
            await receive_json(socket)
            router.send_output(session_id, b"bye", 0, topic)
            router.send_terminal({"type": "x-exit", "sessionId": session_id, "reason": "exit",
                                  "exitCode": 3}, topic)
            output = await receive_bytes(socket)
            exit_frame = await receive_json(socket)
            closing = await socket.receive(timeout=WAIT)
            return output, exit_frame, closing

    output, exit_frame, closing = run_client(steps)
    assert output == b"bye"
    assert exit_frame["type"] == "exit"
    assert exit_frame["reason"] == "exit"
    assert exit_frame["exitCode"] == 3
    assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    wait_until(lambda: len(api.service.terminals) == 0, message="session cleanup")
    assert not [m for t, m in router.received if m.get("type") == "x-stop"]


def test_terminal_router_error_closes_socket(start_refapi, scripted_router, redis_client):
    api = start_refapi()
    router = online_router(scripted_router, redis_client)
    router.echo_terminal = False

    async def steps(session):
        async with session.ws_connect(terminal_url(api, router.router_id)) as socket:
            _, start = await asyncio.to_thread(
                router.wait_for_message, lambda t, m: m.get("type") == "x-start")
            router.send_terminal({"type": "x-error", "sessionId": start["sessionId"],
                                  "code": "limit", "error": "4 sessions are open"},
                                 start["responseTopic"])
            error = await receive_json(socket)
            closing = await socket.receive(timeout=WAIT)
            return error, closing

    error, closing = run_client(steps)
    assert error == {"type": "error", "sessionId": error["sessionId"], "code": "limit",
                     "error": "4 sessions are open"}
    assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)


def test_terminal_start_timeout(start_refapi, scripted_router, redis_client):
    api = start_refapi(terminal_start_timeout=0.5)
    router = online_router(scripted_router, redis_client)
    router.echo_terminal = False

    async def steps(session):
        async with session.ws_connect(terminal_url(api, router.router_id)) as socket:
            return await receive_json(socket)

    error = run_client(steps)
    assert error["type"] == "error"
    assert error["code"] == "timeout"
    assert "did not start the terminal" in error["error"]
    router.wait_for_message(lambda t, m: m.get("type") == "x-stop")


def test_terminal_invalid_control_frame(start_refapi, scripted_router, redis_client):
    api = start_refapi()
    router = online_router(scripted_router, redis_client)

    async def steps(session):
        async with session.ws_connect(terminal_url(api, router.router_id)) as socket:
            await receive_json(socket)
            await socket.send_str("ls\n")
            first = await receive_json(socket)
            await socket.send_json({"type": "resize", "cols": 0, "rows": 10})
            second = await receive_json(socket)
            await socket.send_bytes(b"still open")
            return first, second, await receive_bytes(socket)

    first, second, echoed = run_client(steps)
    assert first["code"] == "invalid_request"
    assert "binary frames" in first["error"]
    assert second["code"] == "invalid_request"
    assert "cols must be an integer" in second["error"]
    assert echoed == b"still open"


def test_terminal_concurrent_sessions(start_refapi, scripted_router, redis_client):
    api = start_refapi()
    router = online_router(scripted_router, redis_client)

    async def one_session(session, number):
        async with session.ws_connect(terminal_url(api, router.router_id)) as socket:
            await receive_json(socket)
            text = b"session %d\n" % number
            await socket.send_bytes(text)
            return await receive_bytes(socket) == text

    async def steps(session):
        return await asyncio.gather(*[one_session(session, number) for number in range(8)])

    assert run_client(steps) == [True] * 8


def test_terminal_two_instances_same_router(start_refapi, scripted_router, redis_client):
    apis = [start_refapi(instance_id="first"), start_refapi(instance_id="second")]
    router = online_router(scripted_router, redis_client)

    async def one_session(session, api):
        async with session.ws_connect(terminal_url(api, router.router_id)) as socket:
            await receive_json(socket)
            await socket.send_bytes(api.settings.instance_id.encode())
            return await receive_bytes(socket)

    async def steps(session):
        return await asyncio.gather(*[one_session(session, api) for api in apis])

    assert run_client(steps) == [b"first", b"second"]


@pytest.mark.parametrize("query, status", [
    ("", 400),
    ("?routerId=bad%20id", 400),
    ("?routerId=r1&cols=abc", 400),
    ("?routerId=r1&rows=0", 400),
])
def test_terminal_bad_query_400(start_refapi, query, status):
    api = start_refapi()
    answer_status, body = http_json("GET", api.url + "/x" + query)
    assert answer_status == status
    assert body["error"]


def test_terminal_offline_and_unknown(start_refapi, scripted_router, redis_client):
    api = start_refapi()
    router = online_router(scripted_router, redis_client)
    router.offline()
    wait_until(lambda: not redis_client.exists("router:online:" + router.router_id),
               message="offline")

    status, body = http_json("GET", api.url + "/x?routerId=" + router.router_id)
    assert status == 409
    assert "offline" in body["error"]
    status, body = http_json("GET", api.url + "/x?routerId=" + new_router_id())
    assert status == 404


def test_terminal_plain_get_needs_upgrade(start_refapi, scripted_router, redis_client):
    api = start_refapi()
    router = online_router(scripted_router, redis_client)
    status, body = http_json("GET", api.url + "/x?routerId=" + router.router_id)
    assert status == 400
    assert "WebSocket" in body["error"]
    assert not [m for t, m in router.received if m.get("type") == "x-start"]


def test_terminal_shutdown_stops_sessions(mosquitto, redis_server, sqlite_url, scripted_router,
                                          redis_client):
    from refapi_testing import RefapiInstance, make_settings

    api = RefapiInstance(make_settings(mosquitto.port, redis_server.port, sqlite_url)).start()
    router = online_router(scripted_router, redis_client)
    router.echo_terminal = False
    try:
        async def steps(session):
            async with session.ws_connect(terminal_url(api, router.router_id)) as socket:
                _, start = await asyncio.to_thread(
                    router.wait_for_message, lambda t, m: m.get("type") == "x-start")
                router.send_terminal({"type": "x-started", "sessionId": start["sessionId"],
                                      "pid": 1}, start["responseTopic"])
                await receive_json(socket)
                stopping = asyncio.create_task(asyncio.to_thread(api.stop))
                error = await receive_json(socket)
                closing = await socket.receive(timeout=WAIT)
                await stopping
                return start["sessionId"], error, closing

        session_id, error, closing = run_client(steps)
    finally:
        api.stop()
    assert error["code"] == "shutdown"
    assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    _, stop = router.wait_for_message(lambda t, m: m.get("type") == "x-stop")
    assert stop["sessionId"] == session_id


def test_terminal_input_limit_keeps_session(start_refapi, scripted_router, redis_client):
    api = start_refapi()
    router = online_router(scripted_router, redis_client)

    async def steps(session):
        async with session.ws_connect(terminal_url(api, router.router_id)) as socket:
            started = await receive_json(socket)
            router.send_terminal({"type": "x-error", "sessionId": started["sessionId"],
                                  "code": "limit", "error": "input dropped"})
            error = await receive_json(socket)
            await socket.send_bytes(b"after limit")
            return error, await receive_bytes(socket)

    error, echoed = run_client(steps)
    assert error["code"] == "limit"
    assert echoed == b"after limit"
