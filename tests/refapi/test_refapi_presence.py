"""Presence tests: status and metrics from a scripted router into Redis, SQL and HTTP."""

import json
import logging

import localservices
from refapi_testing import RefapiInstance, ScriptedRouter, http_json, make_settings, \
    new_router_id, wait_until


def test_metrics_sets_heartbeat_keys_with_ttl(start_refapi, scripted_router, redis_client):
    api = start_refapi()
    router = scripted_router()
    router.send_metrics({"uptime": "12", "cpuLoad": 1.5, "totalMemory": 1, "freeMemory": 1,
                         "activeUsers": 2})

    rid = router.router_id
    wait_until(lambda: redis_client.exists("router:online:" + rid), message="the online key")
    assert redis_client.get("router:online:" + rid) == "1"
    assert int(redis_client.get("router:heartbeat:" + rid)) > 1_600_000_000
    for key in ("router:online:", "router:heartbeat:"):
        ttl = redis_client.ttl(key + rid)
        assert 0 < ttl <= api.settings.heartbeat_ttl
    assert api.settings.heartbeat_ttl == 90
    stored = json.loads(redis_client.get("router:metrics:" + rid))
    assert stored["metrics"]["uptime"] == "12"
    assert redis_client.ttl("router:metrics:" + rid) == -1


def test_heartbeat_ttl_configurable(start_refapi, scripted_router, redis_client):
    start_refapi(heartbeat_ttl=600)
    router = scripted_router()
    router.send_metrics()
    key = "router:online:" + router.router_id
    wait_until(lambda: redis_client.exists(key), message="the online key")
    assert 90 < redis_client.ttl(key) <= 600


def test_online_creates_router_and_nas_rows(start_refapi, scripted_router, redis_client):
    api = start_refapi()
    router = scripted_router(new_router_id("a-router-id-much-longer-than-thirty"))
    rid = router.router_id
    router.online()

    row = wait_until(lambda: api.run(api.service.store.get_router, rid), message="the SQL row")
    assert row["status"] == "online"
    assert row["name"] == rid
    nas = api.run(api.service.store.get_nas, rid)
    assert len(nas) == 1
    assert nas[0]["nasname"] == rid
    assert nas[0]["shortname"] == rid[:30]
    assert nas[0]["type"] == "other"
    assert nas[0]["description"] == "SpotFi router"
    wait_until(lambda: redis_client.exists("router:online:" + rid), message="the online key")

    first_secret = nas[0]["secret"]
    first_seen = row["lastSeen"]
    router.online()
    wait_until(lambda: api.run(api.service.store.get_router, rid)["lastSeen"] > first_seen,
               message="the second ONLINE")
    nas = api.run(api.service.store.get_nas, rid)
    assert len(nas) == 1
    assert nas[0]["secret"] == first_secret


def test_offline_removes_keys(start_refapi, scripted_router, redis_client):
    api = start_refapi()
    router = scripted_router()
    rid = router.router_id
    router.online()
    router.send_metrics()
    wait_until(lambda: redis_client.exists("router:heartbeat:" + rid), message="the keys")

    router.offline()
    wait_until(lambda: not redis_client.exists("router:online:" + rid), message="key removal")
    assert not redis_client.exists("router:heartbeat:" + rid)
    assert redis_client.exists("router:metrics:" + rid)
    # Redis is updated before SQL, so the row may still read online for a moment.
    wait_until(lambda: api.run(api.service.store.get_router, rid)["status"] == "offline",
               message="the SQL row offline")

    status, body = http_json("GET", api.url + "/routers/" + rid)
    assert status == 200
    assert body["status"] == "offline"
    assert body["lastStatus"] == "offline"
    assert body["metrics"]["uptime"] == "86400"


def test_retained_online_counts_at_start(mosquitto, redis_server, sqlite_url, scripted_router,
                                         redis_client):
    router = scripted_router()
    router.online()
    api = RefapiInstance(make_settings(mosquitto.port, redis_server.port, sqlite_url)).start()
    try:
        row = wait_until(lambda: api.run(api.service.store.get_router, router.router_id),
                         message="the retained ONLINE")
        assert row["status"] == "online"
        wait_until(lambda: redis_client.exists("router:online:" + router.router_id),
                   message="the online key")
    finally:
        api.stop()


def test_metrics_register_unknown_router(start_refapi, scripted_router):
    api = start_refapi()
    router = scripted_router()
    router.send_metrics()
    row = wait_until(lambda: api.run(api.service.store.get_router, router.router_id),
                     message="registration from metrics")
    assert row["status"] == "online"
    assert api.run(api.service.store.get_nas, router.router_id)[0]["shortname"]


def test_bad_payloads_logged_once(start_refapi, scripted_router, redis_client, caplog):
    caplog.set_level(logging.WARNING)
    start_refapi()
    router = scripted_router()
    rid = router.router_id
    bad_messages = [
        ("metrics", b"not json"),
        ("metrics", b"[1, 2]"),
        ("metrics", b'{"type": "metrics", "metrics": 5}'),
        ("metrics", b"\xff\xfe"),
        ("status", b"MAYBE"),
        ("status", b"\xff"),
    ]
    for _ in range(2):
        for suffix, payload in bad_messages:
            router.publish(suffix, payload, qos=1)
    router.send_metrics()
    wait_until(lambda: redis_client.exists("router:online:" + rid), message="good metrics")

    warnings = [record.getMessage() for record in caplog.records
                if record.levelno == logging.WARNING and rid in record.getMessage()]
    metrics_warnings = [text for text in warnings if "ignored metrics" in text]
    status_warnings = [text for text in warnings if "ignored status" in text]
    assert len(metrics_warnings) == 1, warnings
    assert "not JSON" in metrics_warnings[0]
    assert len(status_warnings) == 1, warnings
    assert "MAYBE" in status_warnings[0]


def test_bad_topic_logged_once(start_refapi, mosquitto, caplog):
    caplog.set_level(logging.WARNING)
    api = start_refapi()
    router = ScriptedRouter(mosquitto.port, "bad id").connect()
    try:
        router.send_metrics()
        router.send_metrics()
        router.publish("status", "ONLINE", qos=1)
        wait_until(lambda: [r for r in caplog.records if "bad id" in r.getMessage()],
                   message="the warning")
    finally:
        router.close()
    assert api.run(api.service.store.get_router, "bad id") is None
    messages = [r.getMessage() for r in caplog.records if "bad id" in r.getMessage()]
    assert len(messages) == 2, messages  # one per topic, not one per message
    assert "contains ' '" in messages[0]


def test_routers_endpoints(start_refapi, scripted_router):
    api = start_refapi()
    online = scripted_router()
    online.online()
    online.send_metrics()
    offline = scripted_router()
    offline.online()
    offline.offline()
    wait_until(lambda: (api.run(api.service.store.get_router, offline.router_id) or {})
               .get("status") == "offline", message="both routers")

    status, body = http_json("GET", api.url + "/routers")
    assert status == 200
    by_id = {router["id"]: router for router in body["routers"]}
    assert by_id[online.router_id]["status"] == "online"
    assert by_id[offline.router_id]["status"] == "offline"

    status, body = http_json("GET", api.url + "/routers/" + online.router_id)
    assert status == 200
    assert body["status"] == "online"
    assert body["nas"] == {"shortname": online.router_id[:30]}
    assert body["metrics"]["activeUsers"] == 4
    assert body["lastHeartbeat"] > 0

    status, body = http_json("GET", api.url + "/routers/" + new_router_id("unknown"))
    assert status == 404
    assert "unknown" in body["error"]

    status, body = http_json("GET", api.url + "/routers/bad%20id")
    assert status == 400
    assert body["field"] == "routerId"


def test_health_reports_components(start_refapi):
    api = start_refapi()
    status, body = http_json("GET", api.url + "/health")
    assert status == 200
    assert body["status"] == "ok"
    assert body["instance"] == api.settings.instance_id
    assert body["broker"]["connected"] is True
    assert body["redis"]["ok"] is True
    assert body["database"] == {"ok": True, "dialect": "sqlite"}


def test_broker_restart_reconnects(private_mosquitto, redis_server, sqlite_url, redis_client):
    settings = make_settings(private_mosquitto.port, redis_server.port, sqlite_url)
    api = RefapiInstance(settings).start()
    try:
        private_mosquitto.stop()
        wait_until(lambda: not api.service.broker.connected.is_set(), message="the disconnect")
        status, body = http_json("GET", api.url + "/health")
        assert status == 503
        assert body["broker"]["connected"] is False

        private_mosquitto.start()
        wait_until(api.service.broker.connected.is_set, timeout=30, message="the reconnect")
        router = ScriptedRouter(private_mosquitto.port).connect()
        try:
            router.send_metrics()
            wait_until(lambda: redis_client.exists("router:online:" + router.router_id),
                       message="metrics after the reconnect")
        finally:
            router.close()
    finally:
        api.stop()


def test_redis_down_reported_and_survived(mosquitto, sqlite_url, tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    redis_service = localservices.redis(str(tmp_path / "redis"))
    redis_service.start()
    api = RefapiInstance(make_settings(mosquitto.port, redis_service.port, sqlite_url)).start()
    router = ScriptedRouter(mosquitto.port).connect()
    try:
        redis_service.stop()
        router.send_metrics()
        wait_until(lambda: [r for r in caplog.records
                            if router.router_id in r.getMessage() and "Redis" in r.getMessage()],
                   message="the Redis warning")
        status, body = http_json("GET", api.url + "/health")
        assert status == 503
        assert body["redis"]["ok"] is False

        redis_service.start()
        status, body = http_json("GET", api.url + "/health")
        assert status == 200
    finally:
        router.close()
        api.stop()
        redis_service.stop()
