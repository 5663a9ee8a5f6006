"""MQTT client checks against a real broker, run as a script on MicroPython or CPython.

usage: mqtt_live.py CASE ARGUMENT...

tests/test_micropython.py starts the broker, runs one case per process and
reads its output: "PASS CASE" or "FAIL CASE: reason" on the last line, and
for `reconnect` the line "ONLINE 1", after which it restarts the broker.
Cases:
    keepalive PORT SECONDS      stay connected and idle for SECONDS with keepalive 10
    reconnect PORT              subscription and on_message survive a broker restart
    delivery PORT               QoS 1 queued before connecting, 300 KB payload, MQTT 5
                                properties, Last Will
    auth PORT USER PASSWORD     right credentials connect, a wrong password is refused
    tls PORT CA_FILE HOST       TLS with the server certificate checked against CA_FILE
    tls-reject PORT CA_FILE HOST    the same handshake fails
    dead-peer                   silent listeners: no CONNACK, then no PINGRESP
"""

import os
import sys

from mpytest import listen_on_loopback

from spotfi_agent.brokerurl import BrokerURL
from spotfi_agent.loop import Loop
from spotfi_agent.mqtt import MqttClient
from spotfi_agent.session import Session
from spotfi_agent.topics import Topics


class CheckFailed(Exception):
    """Raised when a check fails; the message names the check and the observed value."""


def say(line):
    print(line)
    flush = getattr(sys.stdout, "flush", None)
    if flush is not None:
        flush()


def run_until(loop, predicate, timeout, description):
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise CheckFailed("timed out after %.0f s waiting for %s" % (timeout, description))
        loop.run_once(0.1)


# MicroPython's os has no getpid(), so client ids and topics get a random token.
TOKEN = "".join(["%02x" % byte for byte in os.urandom(4)])


def run_for(loop, seconds):
    end = loop.time() + seconds
    while loop.time() < end:
        loop.run_once(0.1)


def new_client(loop, client_id, keepalive=60, username=None, password=None):
    client = MqttClient(loop, client_id, keepalive, username, password)
    client.events = []
    client.messages = []
    client.on_connect = lambda present: client.events.append("connected")
    client.on_disconnect = lambda reason, was_connected: client.events.append(reason)
    client.on_message = lambda topic, payload, qos, retain, properties: client.messages.append(
        (topic, payload, properties))
    return client


def connect(loop, client, port, context=None, host="127.0.0.1"):
    client.connect("127.0.0.1", port, context, host)
    run_until(loop, lambda: client.events, 10, "the outcome of connecting %s" % client.client_id)
    if client.events[-1] != "connected":
        raise CheckFailed("%s could not connect: %s" % (client.client_id, client.events[-1]))


def check_keepalive(port, seconds):
    loop = Loop()
    client = new_client(loop, "live-keepalive-" + TOKEN, keepalive=10)
    connect(loop, client, port)
    pings = []
    original = client._handle_packet

    def count_pingresp(packet_type, flags, body):
        if packet_type == 13:
            pings.append(loop.time())
        original(packet_type, flags, body)

    client._handle_packet = count_pingresp
    run_for(loop, float(seconds))
    if client.events != ["connected"]:
        raise CheckFailed("connection ended while idle: %s" % client.events[1:])
    if not pings:
        raise CheckFailed("no PINGRESP in %s s with keepalive 10" % seconds)
    say("PINGRESP %d" % len(pings))
    client.disconnect()
    run_until(loop, lambda: len(client.events) > 1, 5, "the disconnect")


def check_reconnect(port):
    loop = Loop()
    topics = Topics("live-" + TOKEN)
    client = MqttClient(loop, "router-" + topics.router_id, 10)
    session = Session(loop, client, [BrokerURL("127.0.0.1", port, False)], topics)
    received = []
    session.on_message = lambda topic, payload, properties: received.append((topic, payload))
    session.start()
    run_until(loop, lambda: session.connections == 1, 10, "the first connection")
    say("ONLINE 1")

    # The test restarts the broker now. Messages published while the
    # connection is down are queued (QoS 1) and must arrive once it is back.
    run_until(loop, lambda: not session.online, 30, "the broker restart to drop the connection")
    client.publish(topics.rpc_request, b"queued while offline", 1)
    run_until(loop, lambda: session.connections == 2, 30, "the reconnection")
    run_until(loop, lambda: (topics.rpc_request, b"queued while offline") in received, 10,
              "the message queued while offline, delivered through the new subscription")

    publisher = new_client(loop, "live-publisher-" + TOKEN)
    connect(loop, publisher, port)
    deadline = loop.time() + 10
    while (topics.x_in, b"after restart") not in received:
        if loop.time() > deadline:
            raise CheckFailed("on_message got no message after the restart: %r" % received)
        publisher.publish(topics.x_in, b"after restart", 0)
        run_for(loop, 0.5)
    publisher.disconnect()
    stopped = []
    session.stop(lambda: stopped.append(True))
    run_until(loop, lambda: stopped, 5, "the session to stop")


def check_delivery(port):
    loop = Loop()
    suffix = TOKEN
    subscriber = new_client(loop, "live-subscriber-" + suffix)
    subscriber.subscribe([("live/%s/#" % suffix, 1)])
    connect(loop, subscriber, port)

    writer = new_client(loop, "live-writer-" + suffix)
    writer.will = ("live/%s/will" % suffix, b"writer gone", 1, False)
    large = (bytes(range(251)) * 1300)[:300 * 1024]
    properties = {"response_topic": "live/%s/reply" % suffix, "correlation_data": b"\x00\xffid"}
    writer.publish("live/%s/large" % suffix, large, 1, False, properties)
    if writer.publish("live/%s/lost" % suffix, b"qos 0", 0):
        raise CheckFailed("a QoS 0 publish without a connection was not reported as dropped")
    # Give the broker time to process the SUBSCRIBE before the writer connects.
    run_for(loop, 0.5)
    connect(loop, writer, port)
    run_until(loop, lambda: subscriber.messages, 15, "the queued 300 KB QoS 1 message")
    topic, payload, received = subscriber.messages[0]
    if topic != "live/%s/large" % suffix or payload != large:
        raise CheckFailed("the 300 KB message arrived changed: %s, %d bytes"
                          % (topic, len(payload)))
    if subscriber.protocol_version != "5" or received != properties:
        raise CheckFailed("MQTT %s delivered the properties %r, not %r"
                          % (subscriber.protocol_version, received, properties))
    run_until(loop, lambda: writer.unacknowledged == 0, 10, "the PUBACK of the large message")

    writer.abort("test aborts without DISCONNECT")
    run_until(loop, lambda: len(subscriber.messages) > 1, 10, "the Last Will")
    if subscriber.messages[1][:2] != ("live/%s/will" % suffix, b"writer gone"):
        raise CheckFailed("unexpected message instead of the Last Will: %r"
                          % (subscriber.messages[1],))
    subscriber.disconnect()


def check_auth(port, username, password):
    loop = Loop()
    good = new_client(loop, "live-auth-good-" + TOKEN, username=username,
                      password=password)
    connect(loop, good, port)
    good.disconnect()

    bad = new_client(loop, "live-auth-bad-" + TOKEN, username=username,
                     password=password + "-wrong")
    bad.connect("127.0.0.1", port)
    run_until(loop, lambda: bad.events, 10, "the refusal")
    reason = bad.events[0]
    # mosquitto 2.0 refuses an MQTT 5 client with reason code 0x86 or 0x87.
    if "refused the connection" not in reason or ("reason code 0x86" not in reason
                                                 and "reason code 0x87" not in reason):
        raise CheckFailed("a wrong password gave: %s" % reason)


def check_tls(port, ca_file, host, expect_success):
    from spotfi_agent import mpytls

    loop = Loop()
    if sys.implementation.name == "micropython":
        context = mpytls.client_context(ca_file)
    else:
        import ssl
        context = ssl.create_default_context(cafile=ca_file)
    client = new_client(loop, "live-tls-" + TOKEN)
    client.subscribe([("live/tls", 1)])
    client.connect("127.0.0.1", port, context, host)
    run_until(loop, lambda: client.events, 10, "the TLS connection outcome")
    outcome = client.events[0]
    if not expect_success:
        if outcome == "connected" or "TLS handshake" not in outcome:
            raise CheckFailed("the handshake was expected to fail, got: %s" % outcome)
        say("REJECTED %s" % outcome)
        return
    if outcome != "connected":
        raise CheckFailed("TLS connection failed: %s" % outcome)
    client.publish("live/tls", b"x" * 70000, 1)
    run_until(loop, lambda: client.messages, 10, "a 70 KB message echoed over TLS")
    if client.messages[0][1] != b"x" * 70000:
        raise CheckFailed("the message came back changed over TLS")
    client.disconnect()


def check_dead_peer():
    loop = Loop()
    listener, port = listen_on_loopback(2)
    accepted = []
    answer_connect = []

    def on_accept():
        connection = listener.accept()[0]
        accepted.append(connection)

        def on_data():
            data = connection.recv(1024)
            if data and answer_connect:
                connection.send(b"\x20\x02\x00\x00")
                answer_connect.pop()

        loop.add_reader(connection.fileno(), on_data)

    loop.add_reader(listener.fileno(), on_accept)
    try:
        # A peer that accepts the connection and never replies to CONNECT.
        silent = new_client(loop, "live-silent")
        silent.connect_timeout = 1.0
        silent.connect("127.0.0.1", port)
        run_until(loop, lambda: silent.events, 10, "the CONNACK timeout")
        if "no CONNACK" not in silent.events[0]:
            raise CheckFailed("a silent peer gave: %s" % silent.events[0])

        # A peer that sends CONNACK and then never replies to PINGREQ.
        answer_connect.append(True)
        quiet = new_client(loop, "live-quiet", keepalive=2)
        connect(loop, quiet, port)
        run_until(loop, lambda: len(quiet.events) > 1, 15, "the PINGRESP timeout")
        if "no PINGRESP" not in quiet.events[1]:
            raise CheckFailed("a peer silent after CONNACK gave: %s" % quiet.events[1])
    finally:
        for connection in accepted:
            loop.remove_reader(connection.fileno())
            connection.close()
        loop.remove_reader(listener.fileno())
        listener.close()


def main(argv):
    if not argv:
        say(__doc__)
        return 2
    case = argv[0]
    arguments = argv[1:]
    try:
        if case == "keepalive":
            check_keepalive(int(arguments[0]), arguments[1])
        elif case == "reconnect":
            check_reconnect(int(arguments[0]))
        elif case == "delivery":
            check_delivery(int(arguments[0]))
        elif case == "auth":
            check_auth(int(arguments[0]), arguments[1], arguments[2])
        elif case == "tls":
            check_tls(int(arguments[0]), arguments[1], arguments[2], True)
        elif case == "tls-reject":
            check_tls(int(arguments[0]), arguments[1], arguments[2], False)
        elif case == "dead-peer":
            check_dead_peer()
        else:
            say("FAIL %s: unknown case" % case)
            return 2
    except CheckFailed as error:
        say("FAIL %s: %s" % (case, error))
        return 1
    say("PASS %s" % case)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
