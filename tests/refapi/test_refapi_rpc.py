"""RPC endpoint tests against a scripted router on the session broker."""

import logging
import time

import pytest

from refapi_testing import http_json, new_router_id, wait_until


def online_router(scripted_router, redis_client):
    router = scripted_router()
    router.online()
    wait_until(lambda: redis_client.exists("router:online:" + router.router_id),
               message="router %s online" % router.router_id)
    return router


def rpc_url(api, router_id):
    return "%s/routers/%s/rpc" % (api.url, router_id)


def test_rpc_success(start_refapi, scripted_router, redis_client):
    api = start_refapi()
    router = online_router(scripted_router, redis_client)

    status, body = http_json("POST", rpc_url(api, router.router_id),
                             {"path": "system", "method": "board", "args": {"a": 1}})
    assert status == 200
    assert body["status"] == "success"
    assert body["result"] == {"echo": {"a": 1}, "path": "system", "method": "board"}
    assert "truncated" not in body

    topic, request = router.wait_for_message(lambda t, m: t.endswith("/rpc/request"))
    assert request["type"] == "rpc"
    assert request["id"] == body["id"]
    assert request["timeout"] == 30
    assert request["args"] == {"a": 1}
    assert request["responseTopic"] == "spotfi/router/%s/rpc/response/%s" % (
        router.router_id, api.settings.instance_id)


def test_rpc_truncated_flag_passed_on(start_refapi, scripted_router, redis_client):
    api = start_refapi()
    router = online_router(scripted_router, redis_client)
    router.rpc_handler = lambda request: {"status": "success", "result": "abc",
                                          "truncated": True}
    status, body = http_json("POST", rpc_url(api, router.router_id),
                             {"path": "file", "method": "read"})
    assert status == 200
    assert body["result"] == "abc"
    assert body["truncated"] is True


def test_rpc_plain_response_topic(start_refapi, scripted_router, redis_client):
    api = start_refapi()
    router = online_router(scripted_router, redis_client)
    router.use_response_topic = False  # as the Go bridge does
    status, body = http_json("POST", rpc_url(api, router.router_id),
                             {"path": "spotfi.agent", "method": "ping", "args": None})
    assert status == 200
    assert body["status"] == "success"


def test_rpc_agent_error_502(start_refapi, scripted_router, redis_client, caplog):
    caplog.set_level(logging.WARNING)
    api = start_refapi()
    router = online_router(scripted_router, redis_client)
    router.rpc_handler = lambda request: {
        "status": "error", "result": None, "code": "failed",
        "error": "ubus call system board failed with exit status 4",
        "stderr": "Command failed: Not found"}

    status, body = http_json("POST", rpc_url(api, router.router_id),
                             {"path": "system", "method": "board"})
    assert status == 502
    assert body["status"] == "error"
    assert body["code"] == "failed"
    assert body["error"] == "ubus call system board failed with exit status 4"
    assert body["stderr"] == "Command failed: Not found"
    logged = [r.getMessage() for r in caplog.records if body["id"] in r.getMessage()]
    assert len(logged) == 1
    assert router.router_id in logged[0]


def test_rpc_invalid_status_502(start_refapi, scripted_router, redis_client):
    api = start_refapi()
    router = online_router(scripted_router, redis_client)
    router.rpc_handler = lambda request: {"status": "weird"}
    status, body = http_json("POST", rpc_url(api, router.router_id),
                             {"path": "system", "method": "board"})
    assert status == 502
    assert "invalid status 'weird'" in body["error"]


def test_rpc_timeout_504(start_refapi, scripted_router, redis_client, caplog):
    caplog.set_level(logging.WARNING)
    api = start_refapi(rpc_grace=0.2)
    router = online_router(scripted_router, redis_client)
    router.rpc_handler = lambda request: None

    started = time.monotonic()
    status, body = http_json("POST", rpc_url(api, router.router_id),
                             {"path": "system", "method": "board", "timeout": 0.5})
    assert status == 504
    assert time.monotonic() - started >= 0.5
    assert "sent no result" in body["error"]
    assert router.router_id in body["error"]
    logged = [r.getMessage() for r in caplog.records if body["id"] in r.getMessage()]
    assert len(logged) == 1


def test_rpc_late_result_ignored(start_refapi, scripted_router, redis_client):
    api = start_refapi(rpc_grace=0.1)
    router = online_router(scripted_router, redis_client)
    router.rpc_handler = lambda request: (time.sleep(0.5), {"status": "success"})[1]
    status, _ = http_json("POST", rpc_url(api, router.router_id),
                          {"path": "system", "method": "board", "timeout": 0.1})
    assert status == 504
    router.rpc_handler = router.answer_success
    status, _ = http_json("POST", rpc_url(api, router.router_id),
                          {"path": "system", "method": "board"})
    assert status == 200


def test_rpc_offline_router_409(start_refapi, scripted_router, redis_client):
    api = start_refapi()
    router = online_router(scripted_router, redis_client)
    router.offline()
    wait_until(lambda: not redis_client.exists("router:online:" + router.router_id),
               message="offline")
    status, body = http_json("POST", rpc_url(api, router.router_id),
                             {"path": "system", "method": "board"})
    assert status == 409
    assert body["error"] == "router %s is offline" % router.router_id


def test_rpc_unknown_router_404(start_refapi):
    api = start_refapi()
    router_id = new_router_id("unknown")
    status, body = http_json("POST", rpc_url(api, router_id),
                             {"path": "system", "method": "board"})
    assert status == 404
    assert body["error"] == "router %s is unknown" % router_id


@pytest.mark.parametrize("body, field", [
    ({"method": "board"}, "path"),
    ({"path": "", "method": "board"}, "path"),
    ({"path": "system"}, "method"),
    ({"path": "system", "method": 5}, "method"),
    ({"path": "system", "method": "board", "args": [1]}, "args"),
    ({"path": "system", "method": "board", "timeout": 0}, "timeout"),
    ({"path": "system", "method": "board", "timeout": 121}, "timeout"),
    ({"path": "system", "method": "board", "timeout": "5"}, "timeout"),
    ({"path": "system", "method": "board", "timeout": True}, "timeout"),
    ({"path": "system", "method": "board", "arg": {}}, "arg"),
    ([1, 2], None),
])
def test_rpc_bad_body_400(start_refapi, body, field):
    api = start_refapi()
    status, answer = http_json("POST", rpc_url(api, "r1"), body)
    assert status == 400
    assert answer["field"] == field
    if field is not None:
        assert repr(field) in answer["error"]


def test_rpc_body_not_json_400(start_refapi):
    api = start_refapi()
    status, answer = http_json("POST", rpc_url(api, "r1"), b"{nope")
    assert status == 400
    assert "not JSON" in answer["error"]


def test_rpc_two_instances_same_router(start_refapi, scripted_router, redis_client):
    first = start_refapi(instance_id="first")
    second = start_refapi(instance_id="second")
    router = online_router(scripted_router, redis_client)

    for api in (first, second, first, second):
        status, body = http_json("POST", rpc_url(api, router.router_id),
                                 {"path": "spotfi.agent", "method": "ping"})
        assert status == 200
        assert body["status"] == "success"

    topics = {message["responseTopic"] for topic, message in router.received
              if topic.endswith("/rpc/request")}
    assert topics == {"spotfi/router/%s/rpc/response/first" % router.router_id,
                      "spotfi/router/%s/rpc/response/second" % router.router_id}


def test_rpc_two_instances_plain_topic(start_refapi, scripted_router, redis_client):
    first = start_refapi(instance_id="first")
    second = start_refapi(instance_id="second")
    router = online_router(scripted_router, redis_client)
    router.use_response_topic = False
    for api in (first, second):
        status, body = http_json("POST", rpc_url(api, router.router_id),
                                 {"path": "spotfi.agent", "method": "ping"})
        assert status == 200
