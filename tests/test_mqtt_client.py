"""The agent's own MQTT client against a real mosquitto, and against scripted faults.

`silent_broker` is a loopback TCP server that sends CONNACK and then nothing
more. It injects the dead-peer fault that a real broker cannot be made to
show on demand. The fall-back from MQTT 5 runs against amqtt
(`mqtt311_broker`), a real broker that supports only MQTT 3.1.1.
`mqtt311_broker_test_double` remains only for the refusal with MQTT 5
reason code 0x84, which no broker on this machine sends. amqtt refuses with
the MQTT 3.1.1 return code 1, and mosquitto 2.0 cannot be limited to one
protocol version (its option accept_protocol_versions came with 2.1). The MQTT 5
fall-back and broker DISCONNECT cases also run through the paho adapter.
"""

import socket
import struct
import threading
import time

import paho.mqtt.client as paho
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

import localservices
from spotfi_agent.loop import Loop
from spotfi_agent.mqtt import MqttClient
from spotfi_agent.paho_transport import PahoClient
from spotfi_agent.session import Backoff


def run_until(loop, predicate, timeout):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %.1f s" % timeout)
        loop.run_once(0.05)


class Recorder:
    def __init__(self, client):
        self.connects = 0
        self.disconnects = []
        self.messages = []
        client.on_connect = self.on_connect
        client.on_disconnect = self.on_disconnect
        client.on_message = self.on_message

    def on_connect(self, session_present):
        self.connects += 1

    def on_disconnect(self, reason, was_connected):
        self.disconnects.append((reason, was_connected))

    def on_message(self, topic, payload, qos, retain, properties):
        self.messages.append((topic, payload, qos, retain, properties))


def connect(loop, client, recorder, port, connects=1):
    disconnects = len(recorder.disconnects)
    client.connect("127.0.0.1", port)
    run_until(loop, lambda: recorder.connects == connects
              or len(recorder.disconnects) > disconnects, 10)
    assert recorder.connects == connects, recorder.disconnects
    # Give the broker time to process the SUBSCRIBE sent after CONNACK.
    time.sleep(0.1)
    loop.run_once(0.1)


def test_client_round_trip_qos0_and_qos1(mosquitto):
    loop = Loop()
    client = MqttClient(loop, "round-trip", keepalive=30)
    recorder = Recorder(client)
    client.subscribe([("test/round-trip/#", 1)])
    client.connect("127.0.0.1", mosquitto.port)
    run_until(loop, lambda: recorder.connects == 1, 5)
    time.sleep(0.1)
    loop.run_once(0.1)

    client.publish("test/round-trip/a", b"zero", 0)
    client.publish("test/round-trip/b", b"one" * 50000, 1)
    run_until(loop, lambda: len(recorder.messages) == 2, 5)
    run_until(loop, lambda: client.unacknowledged == 0, 5)
    client.disconnect()
    run_until(loop, lambda: recorder.disconnects, 5)

    assert recorder.messages[0][:2] == ("test/round-trip/a", b"zero")
    assert recorder.messages[1][1] == b"one" * 50000
    assert recorder.messages[1][2] == 1
    assert recorder.disconnects[0][1] is True


def test_client_keepalive_pings_keep_connection(mosquitto):
    loop = Loop()
    client = MqttClient(loop, "pinger", keepalive=2)
    recorder = Recorder(client)
    client.connect("127.0.0.1", mosquitto.port)
    run_until(loop, lambda: recorder.connects == 1, 5)

    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        loop.run_once(0.2)

    assert recorder.disconnects == []
    assert client.connected
    client.disconnect()
    run_until(loop, lambda: recorder.disconnects, 5)


def test_client_resubscribes_after_broker_restart(private_mosquitto):
    loop = Loop()
    client = MqttClient(loop, "resubscriber", keepalive=10)
    recorder = Recorder(client)
    client.subscribe([("test/resubscribe", 1)])
    client.connect("127.0.0.1", private_mosquitto.port)
    run_until(loop, lambda: recorder.connects == 1, 5)

    private_mosquitto.restart()
    run_until(loop, lambda: recorder.disconnects, 10)
    client.connect("127.0.0.1", private_mosquitto.port)
    run_until(loop, lambda: recorder.connects == 2, 10)
    time.sleep(0.1)
    loop.run_once(0.1)
    client.publish("test/resubscribe", b"after", 1)
    run_until(loop, lambda: recorder.messages, 5)

    assert recorder.messages[0][1] == b"after"
    client.disconnect()


def test_client_queues_qos1_while_disconnected(private_mosquitto):
    loop = Loop()
    client = MqttClient(loop, "queuer", keepalive=10)
    recorder = Recorder(client)
    client.subscribe([("test/queued", 1)])

    assert client.publish("test/queued", b"dropped", 0) is False
    client.publish("test/queued", b"kept", 1)
    client.connect("127.0.0.1", private_mosquitto.port)
    run_until(loop, lambda: recorder.messages, 5)

    assert [message[1] for message in recorder.messages] == [b"kept"]
    client.disconnect()


def test_client_reports_refused_connection():
    import localservices
    loop = Loop()
    client = MqttClient(loop, "refused")
    recorder = Recorder(client)
    client.connect("127.0.0.1", localservices.free_port())
    run_until(loop, lambda: recorder.disconnects, 5)

    reason, was_connected = recorder.disconnects[0]
    assert "Connection refused" in reason
    assert was_connected is False


@pytest.fixture
def silent_broker():
    """Accept one client, send CONNACK one byte at a time, then send nothing more."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    accepted = []

    def serve():
        try:
            connection, _ = server.accept()
        except OSError:
            return
        accepted.append(connection)
        connection.recv(1024)
        for byte in b"\x20\x02\x00\x00":
            connection.sendall(bytes([byte]))
            time.sleep(0.02)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    server.close()
    for connection in accepted:
        connection.close()
    thread.join(5)


def test_client_detects_silent_broker(silent_broker):
    loop = Loop()
    client = MqttClient(loop, "dead-peer", keepalive=2)
    recorder = Recorder(client)
    client.connect("127.0.0.1", silent_broker)
    run_until(loop, lambda: recorder.connects == 1, 5)

    run_until(loop, lambda: recorder.disconnects, 15)

    reason, was_connected = recorder.disconnects[0]
    assert "PINGRESP" in reason
    assert was_connected is True


# MQTT 5.


def test_client_connects_with_mqtt5_by_default(mosquitto):
    loop = Loop()
    client = MqttClient(loop, "v5-default", keepalive=30)
    recorder = Recorder(client)
    connect(loop, client, recorder, mosquitto.port)

    assert client.protocol_version == "5"
    assert "as v5-default (p5," in mosquitto.log_tail(20000)
    client.disconnect()
    run_until(loop, lambda: recorder.disconnects, 5)
    assert recorder.disconnects == [("disconnected by the agent", True)]


def test_client_mqtt311_option_sends_no_properties(mosquitto):
    loop = Loop()
    client = MqttClient(loop, "v311-only", keepalive=30, mqtt_version="3.1.1")
    recorder = Recorder(client)
    client.subscribe([("test/v311/#", 1)])
    connect(loop, client, recorder, mosquitto.port)

    client.publish("test/v311/a", b"plain", 1, False, {"correlation_data": b"\x01"})
    run_until(loop, lambda: recorder.messages, 5)
    client.disconnect()

    assert client.protocol_version == "3.1.1"
    # mosquitto logs its own protocol numbers: p2 is MQTT 3.1.1, p5 is MQTT 5.
    assert "as v311-only (p2," in mosquitto.log_tail(20000)
    assert recorder.messages == [("test/v311/a", b"plain", 1, False, {})]


def test_client_properties_round_trip(mosquitto):
    loop = Loop()
    client = MqttClient(loop, "v5-properties", keepalive=30)
    recorder = Recorder(client)
    client.subscribe([("test/v5-properties/#", 1)])
    connect(loop, client, recorder, mosquitto.port)
    properties = {"response_topic": "test/v5-properties/reply", "correlation_data": b"\x00\xffid"}

    client.publish("test/v5-properties/own", b"one", 1, False, properties)
    client.publish("test/v5-properties/qos0", b"two", 0, False, {"correlation_data": b"c0"})
    client.publish("test/v5-properties/none", b"three", 1)
    run_until(loop, lambda: len(recorder.messages) == 3, 5)
    client.disconnect()

    received = {message[0]: message[4] for message in recorder.messages}
    assert received["test/v5-properties/own"] == properties
    assert received["test/v5-properties/qos0"] == {"correlation_data": b"c0"}
    assert received["test/v5-properties/none"] == {}


def test_client_reads_properties_from_paho(mosquitto):
    """Properties the client does not use, of every value type, are skipped by length."""
    loop = Loop()
    client = MqttClient(loop, "v5-from-paho", keepalive=30)
    recorder = Recorder(client)
    client.subscribe([("test/v5-from-paho", 1)])
    connect(loop, client, recorder, mosquitto.port)
    sender = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="v5-paho-sender",
                         protocol=paho.MQTTv5)
    sender.connect("127.0.0.1", mosquitto.port, 30)
    sender.loop_start()
    try:
        sent = Properties(PacketTypes.PUBLISH)
        sent.PayloadFormatIndicator = 1
        sent.MessageExpiryInterval = 600
        sent.ContentType = "application/json"
        sent.UserProperty = [("trace", "t-1"), ("origin", "test")]
        sent.ResponseTopic = "spotfi/router/r1/rpc/response/api-3"
        sent.CorrelationData = b"\x07corr"
        sender.publish("test/v5-from-paho", b"{}", 1, False, sent).wait_for_publish(10)
        run_until(loop, lambda: recorder.messages, 5)
    finally:
        sender.disconnect()
        sender.loop_stop()
        client.disconnect()

    topic, payload, qos, retain, properties = recorder.messages[0]
    assert payload == b"{}"
    assert properties == {"response_topic": "spotfi/router/r1/rpc/response/api-3",
                          "correlation_data": b"\x07corr"}


@pytest.mark.parametrize("client_class", [MqttClient, PahoClient], ids=["native", "paho"])
def test_client_reports_broker_disconnect_reason(tmp_path, client_class):
    # mosquitto 2.0 sends DISCONNECT 0x9A to an MQTT 5 client that publishes
    # a retained message while retain_available is false.
    broker = localservices.mosquitto(str(tmp_path / "broker"),
                                     extra_lines=["retain_available false"]).start()
    try:
        loop = Loop()
        client = client_class(loop, "v5-disconnected", keepalive=30)
        recorder = Recorder(client)
        connect(loop, client, recorder, broker.port)

        client.publish("test/retained", b"kept", 1, True)
        run_until(loop, lambda: recorder.disconnects, 5)
    finally:
        broker.stop()

    reason, was_connected = recorder.disconnects[0]
    if client_class is MqttClient:
        assert reason == ("127.0.0.1:%d sent DISCONNECT: retain not supported (reason code 0x9A)"
                          % broker.port)
    else:
        # paho-mqtt 2.1 drops the reason code of a DISCONNECT without properties.
        assert reason.startswith("127.0.0.1:%d sent DISCONNECT" % broker.port)
    assert was_connected is True


def test_client_logs_rejected_publish(tmp_path, logs):
    acl = tmp_path / "acl"
    acl.write_text("topic readwrite allowed/#\n")
    broker = localservices.mosquitto(str(tmp_path / "broker"),
                                     extra_lines=["acl_file %s" % acl]).start()
    try:
        loop = Loop()
        client = MqttClient(loop, "v5-denied", keepalive=30)
        recorder = Recorder(client)
        client.subscribe([("allowed/#", 1)])
        connect(loop, client, recorder, broker.port)

        client.publish("denied/topic", b"x", 1)
        client.publish("allowed/topic", b"y", 1)
        run_until(loop, lambda: recorder.messages and client.unacknowledged == 0, 5)
        client.disconnect()
    finally:
        broker.stop()

    assert [message[0] for message in recorder.messages] == ["allowed/topic"]
    warnings = logs.warnings()
    assert len(warnings) == 1
    assert "rejected the message to denied/topic: not authorized (reason code 0x87)" in warnings[0]


def test_client_follows_receive_maximum(tmp_path):
    # mosquitto sends max_inflight_messages to MQTT 5 clients as Receive Maximum.
    broker = localservices.mosquitto(str(tmp_path / "broker"),
                                     extra_lines=["max_inflight_messages 2"]).start()
    try:
        loop = Loop()
        client = MqttClient(loop, "v5-receive-maximum", keepalive=30)
        recorder = Recorder(client)
        client.subscribe([("test/inflight/#", 1)])
        connect(loop, client, recorder, broker.port)

        for index in range(30):
            client.publish("test/inflight/%d" % index, b"%d" % index, 1)
        queued = client.unacknowledged
        run_until(loop, lambda: len(recorder.messages) == 30, 10)
        run_until(loop, lambda: client.unacknowledged == 0, 5)
        client.disconnect()
    finally:
        broker.stop()

    assert queued == 30
    assert [message[1] for message in recorder.messages] == [b"%d" % index for index in range(30)]
    assert recorder.disconnects[0] == ("disconnected by the agent", True)


def test_client_drops_message_over_maximum_packet_size(tmp_path, logs):
    broker = localservices.mosquitto(str(tmp_path / "broker"),
                                     extra_lines=["max_packet_size 1000"]).start()
    try:
        loop = Loop()
        client = MqttClient(loop, "v5-packet-size", keepalive=30)
        recorder = Recorder(client)
        client.subscribe([("test/size/#", 1)])
        connect(loop, client, recorder, broker.port)

        client.publish("test/size/large", b"x" * 2000, 1)
        dropped = client.publish("test/size/large0", b"x" * 2000, 0)
        client.publish("test/size/small", b"fits", 1)
        run_until(loop, lambda: recorder.messages, 5)
        client.disconnect()
        run_until(loop, lambda: recorder.disconnects, 5)
    finally:
        broker.stop()

    assert dropped is False
    assert [message[:2] for message in recorder.messages] == [("test/size/small", b"fits")]
    assert recorder.disconnects == [("disconnected by the agent", True)]
    warnings = logs.warnings()
    assert len(warnings) == 2
    assert "dropped the message to test/size/large:" in warnings[0]
    assert "maximum packet size of broker 127.0.0.1:%d, 1000 bytes" % broker.port in warnings[0]


def test_client_v5_refusal_names_reason(tmp_path, logs):
    passwords = localservices.write_password_file(str(tmp_path / "passwd"), {"user": "right"})
    broker = localservices.mosquitto(str(tmp_path / "broker"), password_file=passwords).start()
    try:
        loop = Loop()
        client = MqttClient(loop, "v5-refused", 30, "user", "wrong")
        recorder = Recorder(client)
        client.connect("127.0.0.1", broker.port)
        run_until(loop, lambda: recorder.disconnects, 5)
    finally:
        broker.stop()

    reason, was_connected = recorder.disconnects[0]
    assert reason.startswith("127.0.0.1:%d refused the connection: " % broker.port)
    assert "(reason code 0x86)" in reason or "(reason code 0x87)" in reason
    assert was_connected is False
    assert logs.warnings() == []


def wait_for_connect_levels(broker, expected, timeout=5.0):
    """Return the protocol levels of amqtt's logged CONNECTs once they equal `expected`.

    After `timeout` seconds the levels logged so far are returned, so the
    caller's assert shows them.
    """
    deadline = time.monotonic() + timeout
    levels = localservices.amqtt_connect_levels(broker)
    while levels != expected and time.monotonic() < deadline:
        time.sleep(0.05)
        levels = localservices.amqtt_connect_levels(broker)
    return levels


def round_trip(loop, client, recorder, topic, payload):
    """Publish `payload` at QoS 1 to a topic the client subscribes to and wait for it."""
    received = len(recorder.messages)
    client.publish(topic, payload, 1)
    run_until(loop, lambda: len(recorder.messages) > received, 5)
    return recorder.messages[received][:2]


# amqtt 0.12.1 decodes every CONNECT payload as MQTT 3.1.1 and checks the
# protocol level only afterwards. An MQTT 5 CONNECT with a Will or a username
# therefore leaves it waiting for bytes that never come, and only a CONNECT
# with neither gets return code 1. These clients set neither. The agent sets
# both, so test_agent_session.py shows what it gets from amqtt.
@pytest.mark.parametrize("client_class", [MqttClient, PahoClient], ids=["native", "paho"])
def test_client_falls_back_to_mqtt311(mqtt311_broker, logs, client_class):
    loop = Loop()
    client = client_class(loop, "v5-fallback", keepalive=30)
    recorder = Recorder(client)
    client.subscribe([("test/fallback/#", 1)])

    connect(loop, client, recorder, mqtt311_broker.port)
    first_version = client.protocol_version
    first_message = round_trip(loop, client, recorder, "test/fallback/first", b"one")
    client.disconnect()
    run_until(loop, lambda: recorder.disconnects, 5)
    connect(loop, client, recorder, mqtt311_broker.port, connects=2)
    second_version = client.protocol_version
    second_message = round_trip(loop, client, recorder, "test/fallback/second", b"two")
    client.disconnect()
    run_until(loop, lambda: len(recorder.disconnects) == 2, 5)

    assert wait_for_connect_levels(mqtt311_broker, [5, 4, 4]) == [5, 4, 4]
    assert first_version == "3.1.1"
    assert second_version == "3.1.1"
    assert first_message == ("test/fallback/first", b"one")
    assert second_message == ("test/fallback/second", b"two")
    assert [reason for reason, was_connected in recorder.disconnects] == \
        ["disconnected by the agent"] * 2
    warnings = logs.warnings()
    assert len(warnings) == 1
    assert "broker 127.0.0.1:%d rejected MQTT 5" % mqtt311_broker.port in warnings[0]
    assert "MQTT 3.1.1" in warnings[0]
    if client_class is MqttClient:
        assert "with CONNACK code 1;" in warnings[0]
    else:
        # paho-mqtt 2.1 turns the MQTT 3.1.1 return code 1 into reason code 0x84.
        assert "(reason code 0x84)" in warnings[0]


@pytest.mark.parametrize("client_class", [MqttClient, PahoClient], ids=["native", "paho"])
def test_client_mqtt311_option_skips_version_5(mqtt311_broker, logs, client_class):
    loop = Loop()
    client = client_class(loop, "v311-direct", keepalive=30, mqtt_version="3.1.1")
    recorder = Recorder(client)
    client.subscribe([("test/v311/#", 1)])

    connect(loop, client, recorder, mqtt311_broker.port)
    message = round_trip(loop, client, recorder, "test/v311/direct", b"direct")
    client.disconnect()
    run_until(loop, lambda: recorder.disconnects, 5)

    assert wait_for_connect_levels(mqtt311_broker, [4]) == [4]
    assert message == ("test/v311/direct", b"direct")
    assert logs.warnings() == []


class Mqtt311BrokerTestDouble:
    """A loopback server in place of a broker that refuses MQTT 5 with reason code 0x84.

    It replies to a CONNECT of protocol level 5 with an MQTT 5 CONNACK of
    reason code 0x84 (unsupported protocol version) and closes the
    connection. It accepts level 4 and then replies to PINGREQ until the
    client leaves. `levels` lists the protocol level of each CONNECT received.
    """

    REFUSAL = b"\x20\x03\x00\x84\x00"

    def __init__(self):
        self.levels = []
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(4)
        self.port = self.server.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            with connection:
                connection.settimeout(10)
                try:
                    self._serve_client(connection)
                except OSError:
                    pass

    def _read_packet(self, connection):
        header = connection.recv(1)
        if not header:
            return None, b""
        length = 0
        for shift in (0, 7, 14, 21):
            digit = connection.recv(1)[0]
            length |= (digit & 0x7F) << shift
            if not digit & 0x80:
                break
        body = b""
        while len(body) < length:
            chunk = connection.recv(length - len(body))
            if not chunk:
                break
            body += chunk
        return header[0] >> 4, body

    def _serve_client(self, connection):
        packet_type, body = self._read_packet(connection)
        if packet_type != 1:
            return
        name_length = struct.unpack("!H", body[:2])[0]
        level = body[2 + name_length]
        self.levels.append(level)
        if level != 4:
            connection.sendall(self.REFUSAL)
            return
        connection.sendall(b"\x20\x02\x00\x00")
        for _ in range(1000):
            packet_type, body = self._read_packet(connection)
            if packet_type is None or packet_type == 14:
                return
            if packet_type == 12:
                connection.sendall(b"\xd0\x00")

    def close(self):
        # On Linux, close() alone does not wake the thread blocked in accept(),
        # so the join below would wait out its timeout. shutdown() wakes it.
        try:
            self.server.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.server.close()
        self.thread.join(5)


@pytest.fixture
def mqtt311_broker_test_double():
    broker = Mqtt311BrokerTestDouble()
    yield broker
    broker.close()


@pytest.mark.parametrize("client_class", [MqttClient, PahoClient], ids=["native", "paho"])
def test_client_falls_back_after_reason_0x84(mqtt311_broker_test_double, logs, client_class):
    broker = mqtt311_broker_test_double
    loop = Loop()
    client = client_class(loop, "v5-fallback-0x84", keepalive=30)
    recorder = Recorder(client)

    connect(loop, client, recorder, broker.port)
    first_version = client.protocol_version
    client.disconnect()
    run_until(loop, lambda: recorder.disconnects, 5)
    connect(loop, client, recorder, broker.port, connects=2)
    client.disconnect()
    run_until(loop, lambda: len(recorder.disconnects) == 2, 5)

    assert first_version == "3.1.1"
    assert broker.levels == [5, 4, 4]
    assert [reason for reason, was_connected in recorder.disconnects] == \
        ["disconnected by the agent"] * 2
    warnings = logs.warnings()
    assert len(warnings) == 1
    assert "broker 127.0.0.1:%d rejected MQTT 5" % broker.port in warnings[0]
    assert "(reason code 0x84)" in warnings[0]
    assert "MQTT 3.1.1" in warnings[0]


def test_backoff_full_jitter_within_bounds():
    backoff = Backoff(base=1.0, cap=60.0, floor=0.2)
    ceilings = [1, 2, 4, 8, 16, 32, 60, 60, 60]

    delays = [backoff.next_delay() for _ in ceilings]

    for delay, ceiling in zip(delays, ceilings):
        assert 0.2 <= delay <= ceiling


def test_backoff_reset_starts_over():
    backoff = Backoff(base=1.0, cap=60.0, floor=0.2, rng=lambda: 1.0)
    for _ in range(10):
        backoff.next_delay()

    backoff.reset()

    assert backoff.next_delay() == 1.0
    assert backoff.next_delay() == 2.0
