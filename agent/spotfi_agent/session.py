"""The router's MQTT session: broker failover, reconnect backoff, status and Last Will.

The session keeps one connection up for as long as the agent runs. After each
connect it publishes `ONLINE` (QoS 1, retained) and the client resubscribes;
the broker publishes the Last Will `OFFLINE` when the connection drops
without a clean shutdown, and stop() publishes `OFFLINE` itself.
"""

import os

from spotfi_agent.log import get_logger

log = get_logger(__name__)

# States of the session, in lifecycle order.
IDLE = "idle"
CONNECTING = "connecting"
ONLINE = "online"
WAITING = "waiting"
STOPPING = "stopping"
STOPPED = "stopped"

# A connection has to stay up this long before the backoff starts again from
# its first step, so a broker that accepts and then drops us at once (for
# example a duplicate client id) cannot cause a tight reconnect loop.
STABLE_AFTER = 30.0
# Pause before trying the next broker of the list within one round.
FAILOVER_DELAY = 0.1
OFFLINE_ACK_TIMEOUT = 1.0


def _random_fraction():
    """Return a float in [0, 1) from os.urandom: the random module costs 0.2 MB of RSS."""
    data = os.urandom(4)
    return (data[0] << 24 | data[1] << 16 | data[2] << 8 | data[3]) / 4294967296.0


class Backoff:
    """Exponential backoff with full jitter: uniform(floor, min(cap, base * 2**attempt))."""

    def __init__(self, base=1.0, cap=60.0, floor=0.2, rng=None):
        self.base = base
        self.cap = cap
        self.floor = floor
        self.attempt = 0
        self._random = rng or _random_fraction

    def next_delay(self):
        ceiling = min(self.cap, self.base * (2 ** min(self.attempt, 16)))
        self.attempt += 1
        return self.floor + (max(ceiling, self.floor) - self.floor) * self._random()

    def reset(self):
        self.attempt = 0


class Session:
    """Keeps the MQTT connection to the first reachable broker of a list.

    `client` is a transport with the MqttClient interface (connect, publish,
    subscribe, disconnect, abort, connected, unacknowledged, protocol_version,
    callbacks). on_message(topic, payload, properties) gets the message
    properties as the client's on_message does.
    `brokers` have host, port, tls and display attributes; `tls_context(broker)`
    returns an ssl context or None.
    """

    def __init__(self, loop, client, brokers, topics, tls_context=None):
        self.loop = loop
        self.client = client
        self.brokers = brokers
        self.topics = topics
        self.tls_context = tls_context or (lambda broker: None)
        self.backoff = Backoff()
        self.state = IDLE
        self.broker_index = 0
        self.connections = 0
        self.connected_at = None
        self.on_online = None
        self.on_message = None
        self._round_failures = 0
        self._retry_timer = None
        self._stop_callback = None
        self._stop_timer = None

        client.will = (topics.status, b"OFFLINE", 1, True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.subscribe([(topics.rpc_request, 1), (topics.x_in, 0)])

    @property
    def broker(self):
        return self.brokers[self.broker_index]

    @property
    def online(self):
        return self.state == ONLINE

    def start(self):
        if self.state != IDLE:
            raise RuntimeError("session already started (state %s)" % self.state)
        self._connect()

    def _connect(self):
        self._retry_timer = None
        if self.state in (STOPPING, STOPPED):
            return
        self.state = CONNECTING
        broker = self.broker
        log.info("router %s: connecting to %s", self.topics.router_id, broker.display)
        try:
            context = self.tls_context(broker)
        except (OSError, ValueError) as error:
            self._on_disconnect("TLS settings for %s are invalid: %s" % (broker.display, error), False)
            return
        self.client.connect(broker.host, broker.port, context, broker.host)

    def _on_connect(self, session_present):
        self.state = ONLINE
        self.connections += 1
        self.connected_at = self.loop.time()
        self._round_failures = 0
        log.info("router %s: connected to %s as client router-%s with MQTT %s",
                 self.topics.router_id, self.broker.display, self.topics.router_id,
                 self.client.protocol_version)
        self.client.publish(self.topics.status, b"ONLINE", 1, True)
        if self.on_online is not None:
            self.on_online()

    def _on_message(self, topic, payload, qos, retain, properties):
        if self.on_message is not None:
            self.on_message(topic, payload, properties)

    def _on_disconnect(self, reason, was_connected):
        if self.state in (STOPPING, STOPPED):
            self._finish_stop()
            return
        router_id = self.topics.router_id
        if was_connected:
            uptime = self.loop.time() - self.connected_at
            if uptime >= STABLE_AFTER:
                self.backoff.reset()
            delay = self.backoff.next_delay()
            log.warning("router %s: connection to %s lost after %.0f s: %s; reconnecting in %.1f s",
                        router_id, self.broker.display, uptime, reason, delay)
        else:
            self._round_failures += 1
            failed = self.broker
            if len(self.brokers) > 1 and self._round_failures < len(self.brokers):
                self.broker_index = (self.broker_index + 1) % len(self.brokers)
                delay = FAILOVER_DELAY
                log.warning("router %s: cannot connect to %s: %s; failing over to %s",
                            router_id, failed.display, reason, self.broker.display)
            else:
                if len(self.brokers) > 1:
                    self.broker_index = (self.broker_index + 1) % len(self.brokers)
                self._round_failures = 0
                delay = self.backoff.next_delay()
                log.warning("router %s: cannot connect to %s: %s; next attempt at %s in %.1f s",
                            router_id, failed.display, reason, self.broker.display, delay)
        self.state = WAITING
        self._retry_timer = self.loop.call_later(delay, self._connect)

    def stop(self, callback):
        """Publish OFFLINE, disconnect cleanly and call callback() once closed.

        OFFLINE waits for its PUBACK for at most OFFLINE_ACK_TIMEOUT seconds.
        """
        if self.state in (STOPPING, STOPPED):
            return
        self._stop_callback = callback
        if self._retry_timer is not None:
            self._retry_timer.cancel()
            self._retry_timer = None
        was_online = self.state == ONLINE
        self.state = STOPPING
        if not was_online:
            self.client.abort("agent stopped")
            self._finish_stop()
            return
        self.client.publish(self.topics.status, b"OFFLINE", 1, True)
        self._stop_deadline = self.loop.time() + OFFLINE_ACK_TIMEOUT
        self._wait_offline_ack()

    def _wait_offline_ack(self):
        if self.state != STOPPING:
            return
        if self.client.connected and self.client.unacknowledged and self.loop.time() < self._stop_deadline:
            self._stop_timer = self.loop.call_later(0.01, self._wait_offline_ack)
            return
        if self.client.unacknowledged:
            log.warning("router %s: OFFLINE was not acknowledged within %.1f s",
                        self.topics.router_id, OFFLINE_ACK_TIMEOUT)
        self.client.disconnect()

    def _finish_stop(self):
        if self.state == STOPPED:
            return
        self.state = STOPPED
        if self._stop_timer is not None:
            self._stop_timer.cancel()
        callback = self._stop_callback
        self._stop_callback = None
        if callback is not None:
            callback()
