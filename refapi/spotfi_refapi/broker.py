"""The instance's MQTT connection: subscribe, hand messages on, reconnect with backoff."""

import asyncio
import json
import logging
import random
import ssl

import aiomqtt

from . import topics
from .errors import BrokerUnavailableError

log = logging.getLogger(__name__)

FIRST_RETRY_DELAY = 1.0
MAX_RETRY_DELAY = 30.0
KEEPALIVE = 30


class Broker:
    """Keeps one aiomqtt connection open and passes each message to `on_message`.

    `on_message(topic, payload, retained)` is a plain function: it must not
    block, because the next message waits for it.
    """

    def __init__(self, settings, instance_id, on_message):
        self.settings = settings
        self.instance_id = instance_id
        self.client_id = "spotfi-refapi-" + instance_id
        self._on_message = on_message
        self._client = None
        self._task = None
        self.connected = asyncio.Event()

    def start(self):
        if self._task is not None:
            raise RuntimeError("the broker connection of instance %s is already started"
                               % self.instance_id)
        self._task = asyncio.create_task(self._run(), name="mqtt " + self.client_id)

    async def stop(self):
        if self._task is None:
            return
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self._task = None

    async def publish(self, topic, message, qos):
        """Publish a JSON message, or raise BrokerUnavailableError while disconnected."""
        client = self._client
        if client is None or not self.connected.is_set():
            raise BrokerUnavailableError("the MQTT broker %s is not connected"
                                         % self.settings.url)
        payload = json.dumps(message, separators=(",", ":"))
        try:
            await client.publish(topic, payload, qos=qos)
        except aiomqtt.MqttError as error:
            raise BrokerUnavailableError("could not publish to %s on the MQTT broker %s: %s"
                                         % (topic, self.settings.url, error)) from None

    def _deliver(self, message):
        try:
            self._on_message(message.topic.value, message.payload, message.retain)
        except Exception:
            # A bug in one handler must not end the subscription for all routers.
            log.exception("failed to handle the MQTT message on %s", message.topic.value)

    def _make_client(self):
        tls_context = ssl.create_default_context() if self.settings.tls else None
        return aiomqtt.Client(self.settings.host, self.settings.port,
                              username=self.settings.username, password=self.settings.password,
                              identifier=self.client_id, clean_session=True,
                              keepalive=KEEPALIVE, tls_context=tls_context, timeout=10)

    async def _run(self):
        delay = FIRST_RETRY_DELAY
        while True:
            try:
                async with self._make_client() as client:
                    for topic_filter, qos in topics.subscriptions(self.instance_id):
                        granted = await client.subscribe(topic_filter, qos=qos)
                        # SUBACK codes of 0x80 and above are failures (MQTT 3.1.1 and 5).
                        if any(getattr(code, "value", code) >= 0x80 for code in granted):
                            log.error("the MQTT broker %s rejected the subscription to %s; "
                                      "check its ACL for user %s", self.settings.url,
                                      topic_filter, self.settings.username)
                    self._client = client
                    self.connected.set()
                    delay = FIRST_RETRY_DELAY
                    log.info("connected to MQTT broker %s as %s", self.settings.url,
                             self.client_id)
                    async for message in client.messages:
                        self._deliver(message)
            except aiomqtt.MqttError as error:
                was_connected = self.connected.is_set()
                self._client = None
                self.connected.clear()
                # Jitter keeps several instances from reconnecting in lockstep.
                wait = delay * random.uniform(0.8, 1.2)
                if was_connected:
                    log.warning("lost the MQTT broker %s: %s; reconnecting in %.1f s",
                                self.settings.url, error, wait)
                else:
                    log.warning("could not connect to MQTT broker %s: %s; retrying in %.1f s",
                                self.settings.url, error, wait)
                await asyncio.sleep(wait)
                delay = min(delay * 2, MAX_RETRY_DELAY)
            finally:
                self._client = None
                self.connected.clear()
