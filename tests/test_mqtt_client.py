"""The agent's own MQTT client against a real mosquitto, and against scripted faults.

`silent_broker` is a loopback TCP server that sends CONNACK and then nothing
more. It injects the dead-peer fault that a real broker cannot be made to
show on demand.
"""

import socket
import threading
import time

import pytest

from spotfi_agent.loop import Loop
from spotfi_agent.mqtt import MqttClient
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

    def on_message(self, topic, payload, qos, retain):
        self.messages.append((topic, payload, qos, retain))


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
