"""The agent's own MQTT 5.0 and 3.1.1 client, driven by spotfi_agent.loop.

It is the default transport because it costs a fraction of paho-mqtt's memory
and start-up time (see docs/benchmarks.md), and it runs on MicroPython. It
sends keepalive pings by itself, treats a silent broker as a lost connection,
retransmits unacknowledged QoS 1 messages after a reconnect, and never blocks
the loop: connect, TLS handshake, reads and writes are all non-blocking.

`mqtt_version` "5" (the default) connects with MQTT 5.0, and "3.1.1" with
MQTT 3.1.1 only. Under "5", spotfi_agent.mqttversion switches a broker to
3.1.1 when it rejects version 5 or sends no CONNACK for it.

Callbacks (attributes, each optional):
    on_connect(session_present)
    on_disconnect(reason, was_connected)  - reason is a one-line message
    on_message(topic, payload, qos, retain, properties)  - properties is a
        dict with the keys "response_topic" (str) and "correlation_data"
        (bytes), each present only when the message carries it (MQTT 5)
"""

import errno
try:
    # CPython's C socket module without the socket.py wrapper, which adds
    # about 0.4 MB of RSS (enum, selectors) and nothing the client uses.
    import _socket as socket
    _ASCII_HOST_AS_BYTES = True
except ImportError:  # MicroPython
    import socket
    _ASCII_HOST_AS_BYTES = False

from spotfi_agent import mqttcodec
from spotfi_agent.compat import MICROPYTHON
from spotfi_agent.log import get_logger
from spotfi_agent.mqttversion import MQTT_5, VersionChooser

log = get_logger(__name__)

# ssl is imported by the first TLS connection only: on CPython 3.11 it costs
# about 4.3 MB of RSS, more than the rest of the agent together.
ssl = None
# CPython's SSLSocket raises these while a non-blocking handshake, read or
# write waits for the peer. MicroPython's returns None instead and has neither.
_SSL_WANT = ()


def _load_ssl():
    global ssl, _SSL_WANT
    if ssl is not None:
        return
    try:
        import ssl as module
    except ImportError:  # MicroPython builds that name it only `tls` (see mpytls)
        return
    ssl = module
    if hasattr(ssl, "SSLWantReadError"):
        _SSL_WANT = (ssl.SSLWantReadError, ssl.SSLWantWriteError)


_WOULD_BLOCK = (errno.EAGAIN, getattr(errno, "EWOULDBLOCK", errno.EAGAIN), errno.EINPROGRESS)
# Linux errno values that MicroPython's errno module does not name.
_EISCONN = getattr(errno, "EISCONN", 106)
# MicroPython's socket module has no IPPROTO_TCP or TCP_NODELAY; these are
# their Linux values.
_IPPROTO_TCP = getattr(socket, "IPPROTO_TCP", 6)
_TCP_NODELAY = getattr(socket, "TCP_NODELAY", 1)

# States of one connection attempt, in the order they are passed through.
CLOSED = "closed"
CONNECTING = "connecting"
HANDSHAKING = "handshaking"
AWAITING_CONNACK = "awaiting-connack"
CONNECTED = "connected"

MAX_INCOMING_PACKET = 2 * 1024 * 1024
MAX_QUEUED_QOS1 = 200
# MicroPython's recv(n) allocates n bytes before it reads. Repeated 64 KB
# requests fragment a heap of a few MB until one fails, so it reads less.
READ_SIZE = 4096 if MICROPYTHON else 65536

# The MQTT 5 Receive Maximum when the broker's CONNACK does not set one, and
# under MQTT 3.1.1, which has no such limit.
DEFAULT_RECEIVE_MAXIMUM = 65535

# Message properties passed to on_message and taken by publish(), by name.
_MESSAGE_PROPERTIES = (("response_topic", mqttcodec.RESPONSE_TOPIC),
                       ("correlation_data", mqttcodec.CORRELATION_DATA))


def _host_argument(host):
    """Return host as getaddrinfo should get it.

    CPython encodes a str host with the idna codec, whose first use imports
    about 1.4 MB of RSS (unicodedata, stringprep, re). An ASCII name needs no
    such encoding, so it goes in as bytes.
    """
    if _ASCII_HOST_AS_BYTES:
        try:
            return host.encode("ascii")
        except UnicodeError:
            pass
    return host


class MqttError(Exception):
    """Raised when the client is used in a way its state does not allow."""


class MqttClient:
    """One MQTT connection at a time, re-connectable with connect()."""

    def __init__(self, loop, client_id, keepalive=60, username=None, password=None, will=None,
                 connect_timeout=10.0, mqtt_version="5"):
        self.loop = loop
        self.client_id = client_id
        self.keepalive = keepalive
        self.username = username
        self.password = password
        self.will = will
        self.connect_timeout = connect_timeout
        self.mqtt_version = mqtt_version
        # "5" or "3.1.1": the protocol of the connection that is up or being made.
        self.protocol_version = None

        self.on_connect = None
        self.on_disconnect = None
        self.on_message = None

        self.state = CLOSED
        self.peer = None
        self._sock = None
        self._fd = None
        self._in = bytearray()
        self._out = bytearray()
        self._writer_registered = False
        self._timer = None
        self._last_sent = 0.0
        self._last_received = 0.0
        self._ping_sent_at = None
        self._next_packet_id = 0
        self._level = mqttcodec.MQTT_V5
        self._keepalive = keepalive
        self._receive_maximum = DEFAULT_RECEIVE_MAXIMUM
        self._maximum_packet_size = None
        self._versions = VersionChooser(client_id)
        self._connack_received = False

        # QoS 1 messages sent and not acknowledged, by packet id, in send
        # order, then those waiting for a connection or for the broker's
        # Receive Maximum: (topic, payload, retain, properties, dup).
        self._inflight = {}
        self._inflight_order = []
        self._queued = []
        self._subscriptions = {}
        self._pending_subscribes = {}
        self._closing = False

    @property
    def connected(self):
        return self.state == CONNECTED

    @property
    def outgoing_bytes(self):
        """Bytes accepted by publish() and not yet written to the socket."""
        return len(self._out)

    @property
    def unacknowledged(self):
        return len(self._inflight) + len(self._queued)

    def connect(self, host, port, ssl_context=None, server_hostname=None):
        """Start connecting; the result arrives through on_connect or on_disconnect."""
        if self.state != CLOSED:
            raise MqttError("connect() while %s to %s" % (self.state, self.peer))
        self.peer = "%s:%d" % (host, port)
        self._target = (host, port, ssl_context, server_hostname)
        self.protocol_version = self._versions.version_for(self.peer, self.mqtt_version)
        if self.protocol_version == MQTT_5:
            self._level = mqttcodec.MQTT_V5
        else:
            self._level = mqttcodec.MQTT_V311
        self._connack_received = False
        if ssl_context is not None:
            _load_ssl()
        self._closing = False
        self._in = bytearray()
        self._out = bytearray()
        try:
            address = socket.getaddrinfo(_host_argument(host), port, 0, socket.SOCK_STREAM)[0]
            sock = socket.socket(address[0], socket.SOCK_STREAM)
        except OSError as error:
            self.loop.call_soon(self._report_failure, "cannot resolve %s: %s" % (host, error))
            return
        sock.setblocking(False)
        try:
            sock.setsockopt(_IPPROTO_TCP, _TCP_NODELAY, 1)
        except (OSError, AttributeError):
            pass
        self._sock = sock
        self._address = address[-1]
        self._fd = sock.fileno()
        self.state = CONNECTING
        self._ssl_context = ssl_context
        self._server_hostname = server_hostname or host
        self._deadline_timer = self.loop.call_later(self.connect_timeout, self._connect_timed_out)
        try:
            sock.connect(address[-1])
        except OSError as error:
            if getattr(error, "errno", None) not in _WOULD_BLOCK:
                self._fail("connection to %s failed: %s" % (self.peer, _describe(error)))
                return
        self.loop.add_writer(self._fd, self._on_connect_writable)
        self._writer_registered = True

    def _on_connect_writable(self):
        self.loop.remove_writer(self._fd)
        self._writer_registered = False
        code = _connect_error(self._sock, self._address)
        if code:
            self._fail("connection to %s failed: %s" % (self.peer, _strerror(code)))
            return
        if self._ssl_context is None:
            self._start_mqtt()
            return
        self.state = HANDSHAKING
        try:
            self._sock = self._ssl_context.wrap_socket(
                self._sock, server_hostname=self._server_hostname,
                do_handshake_on_connect=False)
        except (OSError, ValueError) as error:
            self._fail("TLS set-up for %s failed: %s" % (self.peer, error))
            return
        if hasattr(self._sock, "do_handshake"):
            self._continue_handshake()
            return
        self._out += self._connect_packet()
        self._write_during_handshake()

    def _write_during_handshake(self):
        # MicroPython's SSLSocket has no do_handshake(): its first write runs
        # the handshake and returns None until the handshake is done. The
        # client then mostly waits for the server, so the socket is polled for
        # reading, and the first write that returns a count ends the handshake.
        # NOTE: a handshake that waits for a full send buffer is retried only
        # when the server sends something, else it fails at the connect
        # timeout. This is unlikely, because the client's few KB of handshake
        # fit an empty buffer.
        self.loop.remove_reader(self._fd)
        try:
            sent = self._sock.write(self._out)
        except OSError as error:
            if getattr(error, "errno", None) not in _WOULD_BLOCK:
                self._fail("TLS handshake with %s failed: %s" % (self.peer, _describe(error)))
                return
            sent = None
        except ValueError as error:
            # mbedtls reports certificate errors as ValueError, framed in newlines.
            self._fail("TLS handshake with %s failed: %s"
                       % (self.peer, " ".join(str(error).split())))
            return
        if not sent:
            self.loop.add_reader(self._fd, self._write_during_handshake)
            return
        self._out[:sent] = b""
        self._last_sent = self.loop.time()
        self.state = AWAITING_CONNACK
        self.loop.add_reader(self._fd, self._on_readable)
        self._flush()

    def _continue_handshake(self):
        try:
            self._sock.do_handshake()
        except _SSL_WANT as error:
            wants_write = isinstance(error, ssl.SSLWantWriteError)
            self.loop.remove_reader(self._fd)
            self.loop.remove_writer(self._fd)
            if wants_write:
                self.loop.add_writer(self._fd, self._continue_handshake)
            else:
                self.loop.add_reader(self._fd, self._continue_handshake)
            return
        except (OSError, ValueError) as error:
            self._fail("TLS handshake with %s failed: %s" % (self.peer, error))
            return
        self.loop.remove_reader(self._fd)
        self.loop.remove_writer(self._fd)
        self._start_mqtt()

    def _start_mqtt(self):
        self.state = AWAITING_CONNACK
        self.loop.add_reader(self._fd, self._on_readable)
        self._send(self._connect_packet())

    def _connect_packet(self):
        will = None
        if self.will is not None:
            topic, payload, qos, retain = self.will
            will = (topic, _to_bytes(payload), qos, retain)
        return mqttcodec.encode_connect(self.client_id, self.keepalive, self.username,
                                        self.password, will, True, self._level)

    def _connect_timed_out(self):
        if self.state in (CONNECTING, HANDSHAKING, AWAITING_CONNACK):
            self._fail("no CONNACK from %s within %.0f s" % (self.peer, self.connect_timeout))

    def publish(self, topic, payload, qos=0, retain=False, properties=None):
        """Send a message; return False when a QoS 0 message was dropped.

        QoS 1 messages published while no connection is up, or while the
        broker's Receive Maximum of them await PUBACK, are queued (up to
        MAX_QUEUED_QOS1, oldest dropped first) and sent when that changes.
        `properties` takes the keys of on_message's; MQTT 3.1.1 connections
        send none.
        """
        payload = _to_bytes(payload)
        if qos == 0:
            if self.state != CONNECTED:
                return False
            packet = mqttcodec.encode_publish(topic, payload, 0, retain, 0, False,
                                              self._encode_properties(properties))
            if not self._fits(packet, topic):
                return False
            self._send(packet)
            return True
        self._queued.append((topic, payload, retain, properties, False))
        if len(self._queued) > MAX_QUEUED_QOS1:
            dropped = self._queued.pop(0)
            log.warning("dropped a queued QoS 1 message to %s: %d messages wait to be sent",
                        dropped[0], MAX_QUEUED_QOS1)
        self._send_queued()
        return True

    def _send_queued(self):
        while self._queued and self.state == CONNECTED \
                and len(self._inflight) < self._receive_maximum:
            topic, payload, retain, properties, dup = self._queued.pop(0)
            packet_id = self._new_packet_id()
            packet = mqttcodec.encode_publish(topic, payload, 1, retain, packet_id, dup,
                                              self._encode_properties(properties))
            if not self._fits(packet, topic):
                continue
            self._inflight[packet_id] = (topic, payload, retain, properties)
            self._inflight_order.append(packet_id)
            self._send(packet)

    def _fits(self, packet, topic):
        # An MQTT 5 broker disconnects a client that sends a packet over its
        # Maximum Packet Size, and a QoS 1 message would be sent again after
        # every reconnect, so such a message is dropped.
        if self._maximum_packet_size is None or len(packet) <= self._maximum_packet_size:
            return True
        log.warning("client %s: dropped the message to %s: its packet of %d bytes is over the"
                    " maximum packet size of broker %s, %d bytes", self.client_id, topic,
                    len(packet), self.peer, self._maximum_packet_size)
        return False

    def _encode_properties(self, properties):
        if self._level != mqttcodec.MQTT_V5:
            return None
        encoded = {}
        if properties:
            for name, identifier in _MESSAGE_PROPERTIES:
                if name in properties:
                    encoded[identifier] = properties[name]
        return encoded

    def subscribe(self, topics):
        """Subscribe to (filter, qos) pairs now and again after every reconnect."""
        for topic, qos in topics:
            self._subscriptions[topic] = qos
        if self.state == CONNECTED:
            self._send_subscribe(topics)

    def _send_subscribe(self, topics):
        packet_id = self._new_packet_id()
        self._pending_subscribes[packet_id] = [topic for topic, qos in topics]
        self._send(mqttcodec.encode_subscribe(packet_id, topics, self._level))

    def disconnect(self):
        """Send DISCONNECT after what is queued for the socket, then close.

        The broker then discards the Last Will. on_disconnect is called once
        the socket is closed.
        """
        if self.state != CONNECTED:
            self._fail("disconnected by the agent", clean=True)
            return
        self._closing = True
        self._send(mqttcodec.DISCONNECT_PACKET)

    def abort(self, reason):
        """Close the socket at once without DISCONNECT, so the broker sends the Last Will."""
        if self.state != CLOSED:
            self._fail(reason)

    def _new_packet_id(self):
        while True:
            self._next_packet_id = self._next_packet_id % 65535 + 1
            if self._next_packet_id not in self._inflight:
                return self._next_packet_id

    def _send(self, data):
        self._out += data
        self._flush()

    def _flush(self):
        while self._out and self._sock is not None:
            try:
                sent = self._sock.send(self._out)
            except _SSL_WANT:
                sent = 0
            except OSError as error:
                if getattr(error, "errno", None) in _WOULD_BLOCK:
                    sent = 0
                else:
                    self._fail("write to %s failed: %s" % (self.peer, _describe(error)))
                    return
            if not sent:
                if not self._writer_registered:
                    self.loop.add_writer(self._fd, self._flush)
                    self._writer_registered = True
                return
            # Slice assignment, because MicroPython's bytearray has no `del b[:n]`.
            self._out[:sent] = b""
            self._last_sent = self.loop.time()
        if self._writer_registered and self._sock is not None:
            self.loop.remove_writer(self._fd)
            self._writer_registered = False
        if self._closing and not self._out:
            self._fail("disconnected by the agent", clean=True)

    def _on_readable(self):
        try:
            self._read_available()
        except MemoryError:
            # MicroPython's heap has a fixed size (-X heapsize). Closing the
            # connection frees the buffers of a packet too large for it,
            # where reading on would fail the same way on every event.
            self._fail("out of memory with %d bytes read from %s; start micropython with a"
                       " larger -X heapsize" % (len(self._in), self.peer))

    def _read_available(self):
        while self._sock is not None:
            try:
                data = self._sock.recv(READ_SIZE)
            except _SSL_WANT:
                break
            except OSError as error:
                if getattr(error, "errno", None) in _WOULD_BLOCK:
                    break
                self._fail("read from %s failed: %s" % (self.peer, _describe(error)))
                return
            if data is None:
                # MicroPython's SSLSocket: no decrypted bytes are ready.
                break
            if not data:
                self._fail("%s closed the connection" % self.peer)
                return
            self._in += data
            self._last_received = self.loop.time()
            # TLS may hold decrypted bytes that poll() does not report. A TLS
            # socket without pending() (MicroPython) is read until it returns None.
            pending = getattr(self._sock, "pending", None)
            if pending is None and self._ssl_context is not None:
                continue
            if len(data) < READ_SIZE and not (pending and pending()):
                break
        self._read_packets()

    def _read_packets(self):
        while self._sock is not None:
            try:
                packet = mqttcodec.split_packet(self._in, MAX_INCOMING_PACKET)
            except mqttcodec.ProtocolError as error:
                self._fail("invalid packet from %s: %s" % (self.peer, error))
                return
            if packet is None:
                return
            packet_type, flags, body, used = packet
            self._in[:used] = b""
            try:
                self._handle_packet(packet_type, flags, body)
            except mqttcodec.ProtocolError as error:
                self._fail("invalid packet from %s: %s" % (self.peer, error))
                return

    def _handle_packet(self, packet_type, flags, body):
        if self.state == AWAITING_CONNACK:
            if packet_type != mqttcodec.CONNACK:
                raise mqttcodec.ProtocolError("expected CONNACK, got packet type %d" % packet_type)
            self._on_connack(*mqttcodec.decode_connack(body, self._level))
            return
        if packet_type == mqttcodec.PUBLISH:
            topic, payload, qos, retain, packet_id, properties = mqttcodec.decode_publish(
                flags, body, self._level)
            if qos == 1:
                self._send(mqttcodec.encode_ack(mqttcodec.PUBACK, packet_id))
            elif qos == 2:
                # Subscriptions request QoS 1 at most, but a QoS 2 delivery still gets a PUBREC.
                self._send(mqttcodec.encode_ack(mqttcodec.PUBREC, packet_id))
            if self.on_message is not None:
                self.on_message(topic, payload, qos, retain, _message_properties(properties))
        elif packet_type == mqttcodec.PUBACK:
            self._acknowledge(*mqttcodec.decode_ack(body))
        elif packet_type == mqttcodec.PUBREL:
            self._send(mqttcodec.encode_ack(mqttcodec.PUBCOMP, mqttcodec.decode_packet_id(body)))
        elif packet_type == mqttcodec.SUBACK:
            self._on_suback(*mqttcodec.decode_suback(body, self._level))
        elif packet_type == mqttcodec.PINGRESP:
            self._ping_sent_at = None
        elif packet_type == mqttcodec.DISCONNECT and self._level == mqttcodec.MQTT_V5:
            code, properties = mqttcodec.decode_disconnect(body)
            self._fail("%s sent DISCONNECT: %s" % (self.peer, _reason_text(code, properties)))
        else:
            raise mqttcodec.ProtocolError("unexpected packet type %d" % packet_type)

    def _on_connack(self, session_present, code, properties):
        self._connack_received = True
        if code and self._level == mqttcodec.MQTT_V5 and code in (1, 0x84):
            # A broker that supports only MQTT 3.1.1 rejects version 5 with its
            # return code 1, unacceptable protocol version. 0x84 is MQTT 5's code.
            self._fall_back_to_mqtt311(code)
            return
        if code and self._level == mqttcodec.MQTT_V5:
            self._fail("%s refused the connection: %s" % (self.peer, _reason_text(code, properties)))
            return
        if code:
            reason = mqttcodec.CONNACK_CODES.get(code, "unknown reason")
            self._fail("%s refused the connection: %s (CONNACK code %d)" % (self.peer, reason, code))
            return
        self.state = CONNECTED
        self._deadline_timer.cancel()
        self._versions.accepted(self.peer, self.protocol_version)
        now = self.loop.time()
        self._last_sent = now
        self._last_received = now
        self._ping_sent_at = None
        # An MQTT 5 broker may set the keepalive, the number of QoS 1 messages
        # awaiting PUBACK and the packet size. The client must follow all three.
        self._keepalive = properties.get(mqttcodec.SERVER_KEEP_ALIVE, self.keepalive)
        self._receive_maximum = max(1, properties.get(mqttcodec.RECEIVE_MAXIMUM,
                                                      DEFAULT_RECEIVE_MAXIMUM))
        self._maximum_packet_size = properties.get(mqttcodec.MAXIMUM_PACKET_SIZE)
        self._schedule_keepalive()

        self._pending_subscribes = {}
        if self._subscriptions:
            self._send_subscribe(list(self._subscriptions.items()))
        resend = [self._inflight[packet_id] + (True,) for packet_id in self._inflight_order]
        self._inflight = {}
        self._inflight_order = []
        self._queued = resend + self._queued
        self._send_queued()

        if self.on_connect is not None:
            self.on_connect(bool(session_present))

    def _fall_back_to_mqtt311(self, code):
        if code >= 0x80:
            refusal = mqttcodec.describe_reason(code)
        else:
            refusal = "CONNACK code %d" % code
        self._versions.rejected(self.peer, refusal)
        self._close()
        host, port, ssl_context, server_hostname = self._target
        self.connect(host, port, ssl_context, server_hostname)

    def _acknowledge(self, packet_id, code, properties):
        message = self._inflight.pop(packet_id, None)
        if message is None:
            return
        self._inflight_order.remove(packet_id)
        if code >= 0x80:
            log.warning("client %s: broker %s rejected the message to %s: %s", self.client_id,
                        self.peer, message[0], _reason_text(code, properties))
        self._send_queued()

    def _on_suback(self, packet_id, codes, properties):
        topics = self._pending_subscribes.pop(packet_id, None) or []
        for index, code in enumerate(codes):
            if code < 0x80:
                continue
            topic = topics[index] if index < len(topics) else "?"
            if self._level == mqttcodec.MQTT_V5:
                reason = _reason_text(code, properties)
            else:
                reason = "SUBACK 0x80"
            log.warning("client %s: broker %s rejected the subscription to %s: %s",
                        self.client_id, self.peer, topic, reason)

    def _schedule_keepalive(self):
        if not self._keepalive:
            # An MQTT 5 broker's Server Keep Alive of 0 turns pings off.
            return
        interval = max(1.0, self._keepalive / 4.0)
        self._timer = self.loop.call_later(interval, self._check_keepalive)

    def _check_keepalive(self):
        if self.state != CONNECTED:
            return
        now = self.loop.time()
        keepalive = self._keepalive
        if self._ping_sent_at is not None:
            if now - self._ping_sent_at > max(5.0, keepalive / 2.0):
                self._fail("no PINGRESP from %s within %.0f s" % (self.peer, now - self._ping_sent_at))
                return
        elif now - self._last_sent >= keepalive * 0.75 or now - self._last_received >= keepalive * 0.75:
            # A broker that is only sent QoS 0 messages never replies, so a
            # half-open connection is found only by pinging it.
            self._ping_sent_at = now
            self._send(mqttcodec.PINGREQ_PACKET)
        self._schedule_keepalive()

    def _report_failure(self, reason):
        if self.on_disconnect is not None:
            self.on_disconnect(reason, False)

    def _fail(self, reason, clean=False):
        was_connected = self.state == CONNECTED
        if self.state == CLOSED:
            return
        unanswered = self.state == AWAITING_CONNACK and not self._connack_received
        self._close()
        if unanswered:
            self._versions.unanswered(self.peer, self.protocol_version)
        if not clean:
            log.debug("connection to %s ended: %s", self.peer, reason)
        if self.on_disconnect is not None:
            self.on_disconnect(reason, was_connected)

    def _close(self):
        """Release the socket and timers of the connection, without callbacks."""
        self.state = CLOSED
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if getattr(self, "_deadline_timer", None) is not None:
            self._deadline_timer.cancel()
        if self._fd is not None:
            self.loop.remove_reader(self._fd)
            self.loop.remove_writer(self._fd)
        self._writer_registered = False
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
        self._sock = None
        self._fd = None
        self._out = bytearray()
        self._closing = False


def _message_properties(properties):
    """Return on_message's properties dict from decoded MQTT 5 properties (None under 3.1.1)."""
    selected = {}
    if properties:
        for name, identifier in _MESSAGE_PROPERTIES:
            if identifier in properties:
                selected[name] = properties[identifier]
    return selected


def _reason_text(code, properties):
    """Describe an MQTT 5 reason code with the broker's Reason String, if it sent one."""
    text = mqttcodec.describe_reason(code)
    reason_string = properties.get(mqttcodec.REASON_STRING)
    if reason_string:
        text += ": %r" % reason_string[:200]
    return text


def _to_bytes(payload):
    if isinstance(payload, str):
        return payload.encode("utf-8")
    return bytes(payload)


def _connect_error(sock, address):
    """Return the errno of a finished non-blocking connect, or 0 when it succeeded."""
    getsockopt = getattr(sock, "getsockopt", None)
    if getsockopt is not None:
        return getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    # MicroPython's socket has no getsockopt. On Linux a second connect()
    # raises the error of the first one, or succeeds (or raises EISCONN) once
    # the connection is up.
    try:
        sock.connect(address)
    except OSError as error:
        code = getattr(error, "errno", None) or 0
        return 0 if code == _EISCONN else code
    return 0


def _strerror(code):
    try:
        import os
        return "%s (errno %d)" % (os.strerror(code), code)
    except (ImportError, AttributeError):
        pass
    # MicroPython has no os.strerror, but errno.errorcode names common codes.
    name = getattr(errno, "errorcode", {}).get(code)
    if name:
        return "%s (errno %d)" % (name, code)
    return "errno %d" % code


def _describe(error):
    code = getattr(error, "errno", None)
    if code:
        return _strerror(code)
    return str(error) or error.__class__.__name__
