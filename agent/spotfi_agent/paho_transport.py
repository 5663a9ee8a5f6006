"""paho-mqtt (1.6 or 2.x) behind the MqttClient interface, driven by the agent's loop.

CPython only. paho's own network loop thread is not used: its socket is
registered on spotfi_agent.loop and loop_read, loop_write and loop_misc are
called from there.
"""

import socket

import paho.mqtt.client as paho

from spotfi_agent.log import get_logger

log = get_logger(__name__)

_PAHO_2 = hasattr(paho, "CallbackAPIVersion")


class PahoClient:
    """The MqttClient interface (see spotfi_agent.mqtt) on top of paho-mqtt."""

    def __init__(self, loop, client_id, keepalive=60, username=None, password=None, will=None):
        self.loop = loop
        self.client_id = client_id
        self.keepalive = keepalive
        self.username = username
        self.password = password
        self.will = will
        self.on_connect = None
        self.on_disconnect = None
        self.on_message = None
        self.peer = None
        self._paho = None
        self._fd = None
        self._connected = False
        self._timer = None
        self._subscriptions = {}
        self._queued = []

    @property
    def connected(self):
        return self._connected

    @property
    def outgoing_bytes(self):
        """Bytes paho has queued for the socket; the tunnel pauses reading above a limit."""
        if self._paho is None:
            return 0
        # paho 1.6 and 2.x queue packets in the private deque _out_packet, each
        # a dict with the encoded "packet" and the "pos" written so far.
        queue = getattr(self._paho, "_out_packet", None)
        if queue is None:
            return 1 if self._paho.want_write() else 0
        return sum(len(entry["packet"]) - entry["pos"] for entry in list(queue))

    @property
    def unacknowledged(self):
        if self._paho is None:
            return len(self._queued)
        # paho 1.6 and 2.x keep QoS 1 messages in flight in _out_messages.
        return len(getattr(self._paho, "_out_messages", {})) + len(self._queued)

    def _new_paho(self):
        if _PAHO_2:
            client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                                 clean_session=True, protocol=paho.MQTTv311)
        else:
            client = paho.Client(client_id=self.client_id, clean_session=True, protocol=paho.MQTTv311)
        if self.username is not None:
            client.username_pw_set(self.username, self.password)
        if self.will is not None:
            topic, payload, qos, retain = self.will
            client.will_set(topic, payload, qos, retain)
        client.on_connect = self._paho_connected
        client.on_disconnect = self._paho_disconnected
        client.on_message = self._paho_message
        client.max_queued_messages_set(200)
        return client

    def connect(self, host, port, ssl_context=None, server_hostname=None):
        self.peer = "%s:%d" % (host, port)
        self._paho = self._new_paho()
        if ssl_context is not None:
            self._paho.tls_set_context(ssl_context)
        try:
            # NOTE: paho's connect() resolves and connects synchronously, so an
            # unreachable broker blocks the loop for up to its socket timeout.
            self._paho.connect(host, port, self.keepalive)
        except (OSError, ValueError) as error:
            self._paho = None
            self.loop.call_soon(self._report, "connection to %s failed: %s" % (self.peer, error), False)
            return
        sock = self._paho.socket()
        try:
            # paho leaves Nagle's algorithm on, which delays each small reply
            # behind the broker's delayed ACK (about 40 ms per RPC on Linux).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError):
            pass
        self._fd = sock.fileno()
        self.loop.add_reader(self._fd, self._on_readable)
        self._update_writer()
        self._timer = self.loop.call_later(self._misc_interval(), self._misc)

    def _misc_interval(self):
        # loop_misc sends keepalive pings and notices a silent broker; a
        # quarter of the keepalive is often enough and keeps idle CPU low.
        return max(1.0, min(5.0, self.keepalive / 4.0))

    def _update_writer(self):
        if self._paho is None or self._fd is None:
            return
        if self._paho.want_write():
            self.loop.add_writer(self._fd, self._on_writable)
        else:
            self.loop.remove_writer(self._fd)

    def _on_readable(self):
        self._check(self._paho.loop_read())

    def _on_writable(self):
        self._check(self._paho.loop_write())

    def _misc(self):
        if self._paho is None:
            return
        self._timer = self.loop.call_later(self._misc_interval(), self._misc)
        self._check(self._paho.loop_misc())

    def _check(self, code):
        if self._paho is None:
            return
        if code != 0 and self._fd is not None and self._paho.socket() is None:
            self._closed("connection to %s lost (paho error %s)" % (self.peer, code))
            return
        self._update_writer()

    def _paho_connected(self, client, userdata, flags, reason_code, properties=None):
        code = getattr(reason_code, "value", reason_code)
        if code != 0:
            self._closed("%s refused the connection: %s (CONNACK code %s)"
                         % (self.peer, paho.connack_string(code), code))
            return
        self._connected = True
        if self._subscriptions:
            self._paho.subscribe(list(self._subscriptions.items()))
        queued = self._queued
        self._queued = []
        for topic, payload, qos, retain in queued:
            self._paho.publish(topic, payload, qos, retain)
        self._update_writer()
        if self.on_connect is not None:
            self.on_connect(bool(flags.get("session present", 0) if isinstance(flags, dict)
                                 else getattr(flags, "session_present", False)))

    def _paho_disconnected(self, client, userdata, *args):
        # paho 2.x passes (flags, reason_code, properties), paho 1.6 passes (rc).
        if len(args) >= 2:
            code = args[-2]
        elif args:
            code = args[0]
        else:
            code = None
        code = getattr(code, "value", code)
        if code == 0 or code is None:
            self._closed("disconnected by the agent")
        else:
            self._closed("connection to %s lost (code %s)" % (self.peer, code))

    def _paho_message(self, client, userdata, message):
        if self.on_message is not None:
            self.on_message(message.topic, message.payload, message.qos, message.retain)

    def _closed(self, reason):
        if self._paho is None:
            return
        was_connected = self._connected
        self._connected = False
        if self._fd is not None:
            self.loop.remove_reader(self._fd)
            self.loop.remove_writer(self._fd)
            self._fd = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        paho_client = self._paho
        self._paho = None
        sock = paho_client.socket()
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass
        self._report(reason, was_connected)

    def _report(self, reason, was_connected):
        if self.on_disconnect is not None:
            self.on_disconnect(reason, was_connected)

    def publish(self, topic, payload, qos=0, retain=False):
        if isinstance(payload, str):
            payload = payload.encode("utf-8")
        if not self._connected:
            if qos == 0:
                return False
            self._queued.append((topic, bytes(payload), qos, retain))
            if len(self._queued) > 200:
                self._queued.pop(0)
            return True
        self._paho.publish(topic, bytes(payload), qos, retain)
        self._update_writer()
        return True

    def subscribe(self, topics):
        for topic, qos in topics:
            self._subscriptions[topic] = qos
        if self._connected:
            self._paho.subscribe(list(topics))
            self._update_writer()

    def disconnect(self):
        if self._paho is None:
            self._report("disconnected by the agent", False)
            return
        if not self._connected:
            self._closed("disconnected by the agent")
            return
        self._paho.disconnect()
        # Flush DISCONNECT now: the loop may stop right after this call.
        self._paho.loop_write()
        self._closed("disconnected by the agent")

    def abort(self, reason):
        if self._paho is not None:
            self._closed(reason)
