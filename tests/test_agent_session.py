"""The agent process against a real mosquitto: status, Last Will, metrics, failover, signals,
and where RPC results go over MQTT 5.

Each case runs with both transports (the agent's own client and paho-mqtt).
The last cases run against amqtt, a real broker that supports only MQTT 3.1.1.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import paho.mqtt.client as paho
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

import localservices
from harness import ROOT, HostRouter, MqttObserver, fresh_status, wait_until

TRANSPORTS = ["native", "paho"]


@pytest.fixture
def observer_factory():
    observers = []

    def create(port, topics):
        observer = MqttObserver(port, topics)
        observers.append(observer)
        return observer

    yield create
    for observer in observers:
        observer.close()


@pytest.fixture
def router_factory(tmp_path):
    routers = []

    def create(router_id, broker_ports, **kwargs):
        router = HostRouter(tmp_path / router_id, router_id, broker_ports, **kwargs)
        routers.append(router)
        return router

    yield create
    for router in routers:
        router.stop()


def status_topic(router_id):
    return "spotfi/router/%s/status" % router_id


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_online_retained_after_connect(mosquitto, router_factory, transport):
    router = router_factory("online-%s" % transport, [mosquitto.port], transport=transport).start()

    wait_until(lambda: "connected to" in router.log_text(), 10, message="agent connected")
    payload, retain = fresh_status(mosquitto.port, router.router_id)

    assert payload == "ONLINE"
    assert retain is True


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_metrics_have_go_bridge_keys(mosquitto, router_factory, observer_factory, transport):
    router_id = "metrics-%s" % transport
    observer = observer_factory(mosquitto.port, ["spotfi/router/%s/metrics" % router_id])
    router_factory(router_id, [mosquitto.port], transport=transport).start()

    payload, retain = observer.wait_for("spotfi/router/%s/metrics" % router_id)
    message = json.loads(payload)
    metrics = message["metrics"]

    assert retain is False
    assert message["type"] == "metrics"
    assert isinstance(metrics["uptime"], str)
    assert metrics["uptime"].isdigit()
    assert isinstance(metrics["cpuLoad"], (int, float))
    assert isinstance(metrics["totalMemory"], int)
    assert isinstance(metrics["freeMemory"], int)
    assert isinstance(metrics["activeUsers"], int)
    assert metrics["totalMemory"] >= metrics["freeMemory"] > 0


def test_metrics_from_proc_without_ubus(mosquitto, router_factory, observer_factory):
    router_id = "metrics-proc"
    observer = observer_factory(mosquitto.port, ["spotfi/router/%s/metrics" % router_id])
    router_factory(router_id, [mosquitto.port], with_ubus=False).start()

    payload, _ = observer.wait_for("spotfi/router/%s/metrics" % router_id)
    metrics = json.loads(payload)["metrics"]
    with open("/proc/uptime") as handle:
        uptime = int(float(handle.read().split()[0]))
    with open("/proc/meminfo") as handle:
        total = int(handle.readline().split()[1]) * 1024

    assert metrics["source"] == "proc"
    assert abs(int(metrics["uptime"]) - uptime) <= 5
    assert metrics["totalMemory"] == total
    assert metrics["activeUsers"] == 0


def test_metrics_from_ubus_test_double(mosquitto, router_factory, observer_factory):
    router_id = "metrics-ubus"
    observer = observer_factory(mosquitto.port, ["spotfi/router/%s/metrics" % router_id])
    router_factory(router_id, [mosquitto.port]).start()

    payload, _ = observer.wait_for("spotfi/router/%s/metrics" % router_id)
    metrics = json.loads(payload)["metrics"]

    assert metrics["source"] == "ubus"
    assert metrics["activeUsers"] >= 1


def test_metrics_repeat_every_interval(mosquitto, router_factory, observer_factory):
    router_id = "metrics-interval"
    topic = "spotfi/router/%s/metrics" % router_id
    observer = observer_factory(mosquitto.port, [topic])
    router_factory(router_id, [mosquitto.port], options={"metrics_interval": "5"}).start()

    wait_until(lambda: len(observer.on(topic)) >= 2, 15, message="a second heartbeat")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_kill_gives_retained_offline(mosquitto, router_factory, transport):
    router = router_factory("killed-%s" % transport, [mosquitto.port], transport=transport).start()
    wait_until(lambda: fresh_status(mosquitto.port, router.router_id)[0] == "ONLINE", 10,
               message="ONLINE")

    router.kill()

    wait_until(lambda: fresh_status(mosquitto.port, router.router_id) == ("OFFLINE", True), 5,
               message="retained OFFLINE after kill -9")
    # mosquitto logs MQTT 5 connections as p5; the Last Will came with the MQTT 5 CONNECT.
    assert "as router-%s (p5," % router.router_id in mosquitto.log_tail(10 ** 8)
    assert "with MQTT 5" in router.log_text()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_sigterm_publishes_offline_and_exits(mosquitto, router_factory, observer_factory, transport):
    router_id = "sigterm-%s" % transport
    observer = observer_factory(mosquitto.port, [status_topic(router_id)])
    router = router_factory(router_id, [mosquitto.port], transport=transport).start()
    observer.wait_for(status_topic(router_id), lambda payload: payload == b"ONLINE")

    started = time.monotonic()
    router.signal(signal.SIGTERM)
    status = router.wait(5)
    elapsed = time.monotonic() - started

    assert status == 0
    assert elapsed < 2.0
    assert fresh_status(mosquitto.port, router_id) == ("OFFLINE", True)
    assert "Will" not in router.log_text()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_failover_to_second_broker(tmp_path, router_factory, transport):
    import localservices
    first = localservices.mosquitto(str(tmp_path / "first")).start()
    second = localservices.mosquitto(str(tmp_path / "second")).start()
    try:
        router = router_factory("failover-%s" % transport, [first.port, second.port],
                                transport=transport).start()
        wait_until(lambda: fresh_status(first.port, router.router_id)[0] == "ONLINE", 10,
                   message="ONLINE on the first broker")

        first.stop()

        wait_until(lambda: fresh_status(second.port, router.router_id)[0] == "ONLINE", 30,
                   message="ONLINE on the second broker")
        assert "failing over to mqtt://127.0.0.1:%d" % second.port in router.log_text()
    finally:
        first.stop()
        second.stop()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_broker_restart_reconnects_and_serves_rpc(private_mosquitto, router_factory,
                                                  transport):
    router_id = "restart-%s" % transport
    router = router_factory(router_id, [private_mosquitto.port], transport=transport).start()
    wait_until(lambda: fresh_status(private_mosquitto.port, router_id)[0] == "ONLINE", 10,
               message="ONLINE")

    private_mosquitto.restart()

    wait_until(lambda: fresh_status(private_mosquitto.port, router_id)[0] == "ONLINE", 40,
               interval=0.2, message="ONLINE after the broker restart")
    observer = MqttObserver(private_mosquitto.port, ["spotfi/router/%s/rpc/response" % router_id])
    try:
        request = {"type": "rpc", "id": "after-restart", "path": "spotfi.agent", "method": "ping"}
        observer.publish("spotfi/router/%s/rpc/request" % router_id, json.dumps(request))
        payload, _ = observer.wait_for("spotfi/router/%s/rpc/response" % router_id)
    finally:
        observer.close()
    result = json.loads(payload)

    assert result["id"] == "after-restart"
    assert result["status"] == "success"
    assert result["result"]["pong"] is True
    assert "reconnecting in" in router.log_text()


def test_missing_token_exits_2_without_connecting(mosquitto, router_factory):
    router = router_factory("no-token", [mosquitto.port], options={"token": ""})
    result = subprocess.run(router.interpreter + ["-m", "spotfi_agent", "--root", router.root, "run"],
                            env=router.environment(), capture_output=True, text=True, timeout=20)

    assert result.returncode == 2
    assert "token" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "no-token" not in mosquitto.log_tail()


def test_info_masks_token(mosquitto, router_factory):
    router = router_factory("info-router", [mosquitto.port], token="very-secret-token-123")
    result = subprocess.run([sys.executable, "-m", "spotfi_agent", "--root", router.root, "info"],
                            env=router.environment(), capture_output=True, text=True, timeout=20)

    assert result.returncode == 0
    assert "very-secret-token-123" not in result.stdout
    assert "info-router" in result.stdout
    assert "127.0.0.1:%d" % mosquitto.port in result.stdout


@pytest.mark.parametrize("transport", ["native", "paho"])
def test_check_reports_success(mosquitto, router_factory, transport):
    router = router_factory("check-router-%s" % transport, [mosquitto.port], transport=transport)
    result = subprocess.run([sys.executable, "-m", "spotfi_agent", "--root", router.root, "check"],
                            env=router.environment(), capture_output=True, text=True, timeout=30)

    assert result.returncode == 0
    assert result.stdout.startswith("OK: connected to mqtt://127.0.0.1:%d" % mosquitto.port)


def test_check_reports_bad_token(tmp_path, router_factory):
    import localservices
    passwords = localservices.write_password_file(str(tmp_path / "passwd"),
                                                  {"check-auth": "right-token"})
    broker = localservices.mosquitto(str(tmp_path / "auth"), password_file=passwords).start()
    try:
        router = router_factory("check-auth", [broker.port], token="wrong-token")
        result = subprocess.run([sys.executable, "-m", "spotfi_agent", "--root", router.root,
                                 "check"], env=router.environment(), capture_output=True,
                                text=True, timeout=30)
        router.options["token"] = "right-token"
        router.write_config()
        accepted = subprocess.run([sys.executable, "-m", "spotfi_agent", "--root", router.root,
                                   "check"], env=router.environment(), capture_output=True,
                                  text=True, timeout=30)
    finally:
        broker.stop()

    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1
    assert "not authorized" in result.stderr or "bad username or password" in result.stderr
    assert "wrong-token" not in result.stderr
    assert accepted.returncode == 0


def test_duplicate_client_id_backs_off(mosquitto, tmp_path):
    """Two agents with one router id take the connection from each other; backoff bounds the churn."""
    first = HostRouter(tmp_path / "dup-a", "duplicate-id", [mosquitto.port])
    second = HostRouter(tmp_path / "dup-b", "duplicate-id", [mosquitto.port])
    first.start()
    second.start()
    try:
        time.sleep(12)
        connects = first.log_text().count("connected to") + second.log_text().count("connected to")
    finally:
        first.stop()
        second.stop()

    # Without backoff the pair reconnects hundreds of times in 12 s.
    assert 2 <= connects <= 20


# RPC results over MQTT 5.


class Mqtt5Requester:
    """A paho MQTT 5 client where an API instance would be: it sends requests with
    properties and records each message it receives with its Correlation Data.
    """

    def __init__(self, port, topics):
        self.messages = []
        self._lock = threading.Lock()
        connected = threading.Event()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2,
                                  client_id="requester-%d-%d" % (os.getpid(), id(self)),
                                  protocol=paho.MQTTv5)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda *args: connected.set()
        self.client.connect("127.0.0.1", port, 30)
        self.client.loop_start()
        if not connected.wait(10):
            raise AssertionError("requester could not connect to 127.0.0.1:%d" % port)
        for topic in topics:
            self.client.subscribe(topic, 1)

    def _on_message(self, client, userdata, message):
        correlation_data = getattr(message.properties, "CorrelationData", None)
        try:
            payload = json.loads(message.payload)
        except ValueError:
            payload = {"text": message.payload.decode("utf-8", "replace")}
        with self._lock:
            self.messages.append((message.topic, payload, correlation_data))

    def request(self, topic, message, response_topic=None, correlation_data=None):
        properties = Properties(PacketTypes.PUBLISH)
        if response_topic is not None:
            properties.ResponseTopic = response_topic
        if correlation_data is not None:
            properties.CorrelationData = correlation_data
        self.client.publish(topic, json.dumps(message), 1, False, properties).wait_for_publish(10)

    def wait_for_result(self, request_id, timeout=10.0):
        """Return (topic, result, correlation data) of the first result of `request_id`."""
        def found():
            with self._lock:
                for topic, payload, correlation_data in self.messages:
                    if payload.get("type") == "rpc-result" and payload.get("id") == request_id:
                        return topic, payload, correlation_data
            return None
        return wait_until(found, timeout, message="the result of rpc %s" % request_id)

    def results(self, request_id):
        """Return every (topic, result, correlation data) received for `request_id`."""
        with self._lock:
            return [message for message in self.messages
                    if message[1].get("type") == "rpc-result" and message[1].get("id") == request_id]

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def requester_factory():
    requesters = []

    def create(port, topics):
        requester = Mqtt5Requester(port, topics)
        requesters.append(requester)
        return requester

    yield create
    for requester in requesters:
        requester.close()


def ping(request_id, **extra):
    message = {"type": "rpc", "id": request_id, "path": "spotfi.agent", "method": "ping"}
    message.update(extra)
    return message


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_rpc_result_on_mqtt5_response_topic(mosquitto, router_factory, requester_factory,
                                            transport):
    router_id = "v5-reply-%s" % transport
    prefix = "spotfi/router/%s/" % router_id
    requester = requester_factory(mosquitto.port, [prefix + "rpc/#"])
    router_factory(router_id, [mosquitto.port], transport=transport).start()
    wait_until(lambda: fresh_status(mosquitto.port, router_id)[0] == "ONLINE", 10,
               message="ONLINE")
    reply_topic = prefix + "rpc/response/api-2"

    requester.request(prefix + "rpc/request", ping("v5-1"), reply_topic, b"\x00corr-v5-1")
    topic, result, correlation_data = requester.wait_for_result("v5-1")

    assert topic == reply_topic
    assert correlation_data == b"\x00corr-v5-1"
    assert result["status"] == "success"
    assert result["result"]["pong"] is True
    assert len(requester.results("v5-1")) == 1


PAHO_1_6_DIR = os.path.join(ROOT, ".venv", "paho-1.6")


@pytest.mark.parametrize("mqtt_version", ["5", "3.1.1"])
def test_paho_1_6_transport_serves_and_stops(mosquitto, router_factory, requester_factory,
                                             mqtt_version):
    """The paho transport with paho-mqtt 1.6.1, which `make venv` installs beside the venv."""
    if not os.path.isdir(os.path.join(PAHO_1_6_DIR, "paho")):
        pytest.fail("paho-mqtt 1.6.1 is missing from %s; run `make venv`" % PAHO_1_6_DIR)
    router_id = "paho16-%s" % mqtt_version.replace(".", "")
    prefix = "spotfi/router/%s/" % router_id
    requester = requester_factory(mosquitto.port, [prefix + "rpc/#"])
    router = router_factory(router_id, [mosquitto.port], transport="paho",
                            options={"mqtt_version": mqtt_version})
    base_environment = router.environment
    router.environment = lambda: dict(
        base_environment(), PYTHONPATH=PAHO_1_6_DIR + os.pathsep + base_environment()["PYTHONPATH"])
    version = subprocess.run([sys.executable, "-c", "import paho.mqtt; print(paho.mqtt.__version__)"],
                             env=router.environment(), capture_output=True, text=True, timeout=30)
    check = subprocess.run([sys.executable, "-m", "spotfi_agent", "--root", router.root, "check"],
                           env=router.environment(), capture_output=True, text=True, timeout=30)
    router.start()
    wait_until(lambda: fresh_status(mosquitto.port, router_id)[0] == "ONLINE", 10,
               message="ONLINE")

    requester.request(prefix + "rpc/request", ping("p16-1"), prefix + "rpc/response/api-3",
                      b"corr-p16")
    topic, result, correlation_data = requester.wait_for_result("p16-1")
    router.signal(signal.SIGTERM)
    exit_status = router.wait(5)
    status = fresh_status(mosquitto.port, router_id)

    assert version.stdout.strip() == "1.6.1"
    assert check.returncode == 0, check.stdout + check.stderr
    assert ("with MQTT %s" % mqtt_version) in check.stdout
    assert result["status"] == "success"
    if mqtt_version == "5":
        assert topic == prefix + "rpc/response/api-3"
        assert correlation_data == b"corr-p16"
    else:
        # MQTT 3.1.1 carries no properties, so the result goes to rpc/response.
        assert topic == prefix + "rpc/response"
        assert correlation_data is None
    assert exit_status == 0
    assert status == ("OFFLINE", True)
    assert "Traceback" not in router.log_text()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_rpc_response_topic_outside_prefix(mosquitto, router_factory, requester_factory,
                                           transport):
    router_id = "v5-outside-%s" % transport
    prefix = "spotfi/router/%s/" % router_id
    outside = "spotfi/router/other-router/rpc/response"
    requester = requester_factory(mosquitto.port, [prefix + "rpc/#", outside])
    router = router_factory(router_id, [mosquitto.port], transport=transport).start()
    wait_until(lambda: fresh_status(mosquitto.port, router_id)[0] == "ONLINE", 10,
               message="ONLINE")

    requester.request(prefix + "rpc/request", ping("v5-2"), outside, b"corr-v5-2")
    topic, result, correlation_data = requester.wait_for_result("v5-2")

    assert topic == prefix + "rpc/response"
    assert correlation_data == b"corr-v5-2"
    assert result["status"] == "success"
    assert "MQTT 5 Response Topic \"%s\" is not a topic under %s" % (outside, prefix) \
        in router.log_text()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_rpc_response_topic_property_beats_field(mosquitto, router_factory, requester_factory,
                                                 transport):
    router_id = "v5-both-%s" % transport
    prefix = "spotfi/router/%s/" % router_id
    requester = requester_factory(mosquitto.port, [prefix + "rpc/#"])
    router_factory(router_id, [mosquitto.port], transport=transport).start()
    wait_until(lambda: fresh_status(mosquitto.port, router_id)[0] == "ONLINE", 10,
               message="ONLINE")
    property_topic = prefix + "rpc/response/from-property"
    field_topic = prefix + "rpc/response/from-field"

    requester.request(prefix + "rpc/request", ping("v5-3", responseTopic=field_topic),
                      property_topic)
    topic, result, correlation_data = requester.wait_for_result("v5-3")
    time.sleep(0.5)

    assert topic == property_topic
    assert correlation_data is None
    assert [message[0] for message in requester.results("v5-3")] == [property_topic]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_mqtt311_option_uses_field_only(mosquitto, router_factory, requester_factory, transport):
    router_id = "v311-%s" % transport
    prefix = "spotfi/router/%s/" % router_id
    requester = requester_factory(mosquitto.port, [prefix + "rpc/#"])
    router = router_factory(router_id, [mosquitto.port], transport=transport,
                            options={"mqtt_version": "3.1.1"}).start()
    wait_until(lambda: fresh_status(mosquitto.port, router_id)[0] == "ONLINE", 10,
               message="ONLINE")
    field_topic = prefix + "rpc/response/api-9"

    # The broker drops the properties when it delivers to an MQTT 3.1.1 client.
    requester.request(prefix + "rpc/request", ping("v311-1", responseTopic=field_topic),
                      prefix + "rpc/response/from-property", b"lost")
    topic, result, correlation_data = requester.wait_for_result("v311-1")
    requester.request(prefix + "rpc/request", ping("v311-2"), prefix + "rpc/response/p", b"x")
    plain_topic, plain_result, plain_correlation = requester.wait_for_result("v311-2")

    assert topic == field_topic
    assert correlation_data is None
    assert result["status"] == "success"
    assert plain_topic == prefix + "rpc/response"
    assert plain_correlation is None
    assert "with MQTT 3.1.1" in router.log_text()
    assert "as router-%s (p2," % router_id in mosquitto.log_tail(10 ** 8)


# A real broker that supports only MQTT 3.1.1 (amqtt).


def retained_status(port, router_id):
    """Return the retained status a new MQTT 3.1.1 subscriber gets, or None after 1 s."""
    try:
        return fresh_status(port, router_id, timeout=1.0)
    except AssertionError:
        return None


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_mqtt311_broker_default_settings_fall_back(mqtt311_broker, router_factory, transport):
    # amqtt 0.12.1 reads an MQTT 5 CONNECT as MQTT 3.1.1. With the agent's
    # will and username in it, amqtt waits for bytes that never come and
    # sends no CONNACK at all, so no refusal code starts the fall-back. The
    # unanswered attempt (10 s CONNACK timeout, or paho's keepalive) must.
    router_id = "amqtt-default-%s" % transport
    router = router_factory(router_id, [mqtt311_broker.port], transport=transport).start()

    wait_until(lambda: retained_status(mqtt311_broker.port, router_id) == ("ONLINE", True), 60,
               interval=0.5, message="ONLINE after the unanswered MQTT 5 attempt")
    first_levels = localservices.amqtt_connect_levels(mqtt311_broker)
    mqtt311_broker.restart()
    wait_until(lambda: router.log_text().count("connected to mqtt://") >= 2, 30, interval=0.2,
               message="a reconnect after the broker restart")
    later_levels = localservices.amqtt_connect_levels(mqtt311_broker)
    router.stop()
    log_text = router.log_text()

    # amqtt never finishes reading the MQTT 5 CONNECT, so its log lists
    # only the MQTT 3.1.1 ones; the agent's log shows the first attempt.
    assert log_text.count("sent no CONNACK for an MQTT 5 CONNECT") == 1
    assert log_text.count("sent no CONNACK for MQTT 5 but accepted MQTT 3.1.1") == 1
    assert "with MQTT 3.1.1" in log_text
    assert first_levels[-1] == 4
    # After the restart the broker gets MQTT 3.1.1 straight away.
    assert set(later_levels[len(first_levels):]) == {4}


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_mqtt311_broker_online_rpc_and_will(mqtt311_broker, router_factory, transport):
    router_id = "amqtt-%s" % transport
    router = router_factory(router_id, [mqtt311_broker.port], transport=transport,
                            options={"mqtt_version": "3.1.1"}).start()
    wait_until(lambda: "connected to" in router.log_text(), 10, message="agent connected")
    online = fresh_status(mqtt311_broker.port, router_id)

    observer = MqttObserver(mqtt311_broker.port, ["spotfi/router/%s/rpc/response" % router_id])
    try:
        observer.publish("spotfi/router/%s/rpc/request" % router_id, json.dumps(ping("amqtt-1")))
        payload, _ = observer.wait_for("spotfi/router/%s/rpc/response" % router_id)
    finally:
        observer.close()
    result = json.loads(payload)

    router.kill()
    wait_until(lambda: retained_status(mqtt311_broker.port, router_id) == ("OFFLINE", True),
               10, message="retained OFFLINE after kill -9")

    assert online == ("ONLINE", True)
    assert result["id"] == "amqtt-1"
    assert result["status"] == "success"
    assert result["result"]["pong"] is True
    assert "with MQTT 3.1.1" in router.log_text()
    assert set(localservices.amqtt_connect_levels(mqtt311_broker)) == {4}
