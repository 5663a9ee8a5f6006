"""paho-mqtt (1.6 or 2.x) behind the MqttClient interface, driven by the agent's loop.

CPython only. paho's own network loop thread is not used: its socket is
registered on spotfi_agent.loop and loop_read, loop_write and loop_misc are
called from there. MQTT 5 and the fall-back to MQTT 3.1.1 work as in
spotfi_agent.mqtt.
"""

import socket

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from spotfi_agent import mqttcodec
from spotfi_agent.mqttversion import MQTT_5, VersionChooser

_PAHO_2 = hasattr(paho, "CallbackAPIVersion")


class PahoClient:
    """The MqttClient interface (see spotfi_agent.mqtt) on top of paho-mqtt."""

    def __init__(self, loop, client_id, keepalive=60, username=None, password=None, will=None,
                 mqtt_version="5"):
        self.loop = loop
        self.client_id = client_id
        self.keepalive = keepalive
        self.username = username
        self.password = password
        self.will = will
        self.mqtt_version = mqtt_version
        self.protocol_version = None
        self._versions = VersionChooser(client_id)
        # True from a sent CONNECT until its CONNACK arrives, whatever its code.
        self._awaiting_connack = False
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

    @property
    def _mqtt5(self):
        return self.protocol_version == MQTT_5

    def _new_paho(self):
        # paho rejects clean_session under MQTT 5, where connect() sets clean start.
        if self._mqtt5:
            protocol, clean_session = paho.MQTTv5, None
        else:
            protocol, clean_session = paho.MQTTv311, True
        if _PAHO_2:
            client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                                 clean_session=clean_session, protocol=protocol)
        else:
            client = paho.Client(client_id=self.client_id, clean_session=clean_session,
                                 protocol=protocol)
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
        self._target = (host, port, ssl_context, server_hostname)
        self.protocol_version = self._versions.version_for(self.peer, self.mqtt_version)
        self._paho = self._new_paho()
        if ssl_context is not None:
            self._paho.tls_set_context(ssl_context)
        try:
            # NOTE: paho's connect() resolves and connects synchronously, so an
            # unreachable broker blocks the loop for up to its socket timeout.
            if self._mqtt5:
                # Without a Session Expiry Interval the session ends with the
                # connection, as a clean session does under MQTT 3.1.1.
                self._paho.connect(host, port, self.keepalive, clean_start=True)
            else:
                self._paho.connect(host, port, self.keepalive)
        except (OSError, ValueError) as error:
            self._paho = None
            self.loop.call_soon(self._report, "connection to %s failed: %s" % (self.peer, error), False)
            return
        self._awaiting_connack = True
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
        self._awaiting_connack = False
        code = getattr(reason_code, "value", reason_code)
        if self._mqtt5 and code == 0x84:
            # paho 1.6 and 2.x report an MQTT 3.1.1 broker's refusal of
            # version 5 (return code 1) as 0x84, as a version 5 broker sends it.
            self._fall_back_to_mqtt311(client, code)
            return
        if code >= 0x80:
            # paho 2.x gives MQTT 5 reason codes for MQTT 3.1.1 connections too.
            self._closed("%s refused the connection: %s"
                         % (self.peer, mqttcodec.describe_reason(code)))
            return
        if code != 0:
            self._closed("%s refused the connection: %s (CONNACK code %s)"
                         % (self.peer, paho.connack_string(code), code))
            return
        self._connected = True
        self._versions.accepted(self.peer, self.protocol_version)
        if self._subscriptions:
            self._paho.subscribe(list(self._subscriptions.items()))
        queued = self._queued
        self._queued = []
        for topic, payload, qos, retain, message_properties in queued:
            self._paho.publish(topic, payload, qos, retain,
                               self._paho_properties(message_properties))
        self._update_writer()
        session_present = bool(flags.get("session present", 0) if isinstance(flags, dict)
                               else getattr(flags, "session_present", False))
        # The owner hears of the connection on the next loop turn, outside
        # paho's callback: paho 2.x holds a lock there that its disconnect()
        # also takes, so `spotfi-agent check` disconnecting at once hung.
        self.loop.call_soon(self._report_connected, self._paho, session_present)

    def _report_connected(self, paho_client, session_present):
        if self._paho is not paho_client or not self._connected:
            return
        if self.on_connect is not None:
            self.on_connect(session_present)

    def _fall_back_to_mqtt311(self, client, code):
        self._versions.rejected(self.peer, mqttcodec.describe_reason(code))
        # paho reports the refusal to on_disconnect once this callback returns.
        client.on_connect = None
        client.on_disconnect = None
        client.on_message = None
        self._release()
        host, port, ssl_context, server_hostname = self._target
        self.connect(host, port, ssl_context, server_hostname)

    def _paho_disconnected(self, client, userdata, *args):
        # paho 2.x passes (flags, reason_code, properties). paho 1.6 passes
        # (rc) under MQTT 3.1.1 and (reason_code, properties) under MQTT 5.
        from_broker = False
        if len(args) == 3:
            from_broker = getattr(args[0], "is_disconnect_packet_from_server", False)
            code = args[1]
        elif args:
            code = args[0]
        else:
            code = None
        code = getattr(code, "value", code)
        if from_broker and code is not None and code >= 0x80:
            self._closed("%s sent DISCONNECT: %s" % (self.peer, mqttcodec.describe_reason(code)))
        elif from_broker:
            # paho 2.1 reads a DISCONNECT's reason code only when properties follow it.
            self._closed("%s sent DISCONNECT" % self.peer)
        elif code == 0 or code is None:
            self._closed("disconnected by the agent")
        else:
            self._closed("connection to %s lost (code %s)" % (self.peer, code))

    def _paho_message(self, client, userdata, message):
        if self.on_message is None:
            return
        properties = {}
        received = getattr(message, "properties", None)
        if received is not None:
            response_topic = getattr(received, "ResponseTopic", None)
            if response_topic is not None:
                properties["response_topic"] = response_topic
            correlation_data = getattr(received, "CorrelationData", None)
            if correlation_data is not None:
                properties["correlation_data"] = bytes(correlation_data)
        self.on_message(message.topic, message.payload, message.qos, message.retain, properties)

    def _paho_properties(self, properties):
        """Return paho's PUBLISH properties for publish()'s, or None."""
        if not properties or not self._mqtt5:
            return None
        result = Properties(PacketTypes.PUBLISH)
        if "response_topic" in properties:
            result.ResponseTopic = properties["response_topic"]
        if "correlation_data" in properties:
            result.CorrelationData = properties["correlation_data"]
        return result

    def _closed(self, reason):
        if self._paho is None:
            return
        was_connected = self._connected
        unanswered = self._awaiting_connack
        self._release()
        if unanswered:
            self._versions.unanswered(self.peer, self.protocol_version)
        self._report(reason, was_connected)

    def _release(self):
        """Drop the paho client and its socket and timer, without callbacks."""
        self._connected = False
        self._awaiting_connack = False
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

    def _report(self, reason, was_connected):
        if self.on_disconnect is not None:
            self.on_disconnect(reason, was_connected)

    def publish(self, topic, payload, qos=0, retain=False, properties=None):
        if isinstance(payload, str):
            payload = payload.encode("utf-8")
        if not self._connected:
            if qos == 0:
                return False
            self._queued.append((topic, bytes(payload), qos, retain, properties))
            if len(self._queued) > 200:
                self._queued.pop(0)
            return True
        self._paho.publish(topic, bytes(payload), qos, retain, self._paho_properties(properties))
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
        paho_client = self._paho
        paho_client.disconnect()
        # paho 2.x writes DISCONNECT at once when the socket takes it, and
        # its on_disconnect then closes this client. Otherwise DISCONNECT is
        # flushed here, because the loop may stop right after this call.
        if self._paho is paho_client:
            paho_client.loop_write()
        self._closed("disconnected by the agent")

    def abort(self, reason):
        if self._paho is not None:
            self._closed(reason)
