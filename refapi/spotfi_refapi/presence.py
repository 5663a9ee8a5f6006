"""Router presence from `status` and `metrics` messages, kept in Redis and SQL.

Redis keys per router:

- `router:heartbeat:{id}`: Unix time of the last metrics or ONLINE, TTL heartbeat_ttl
- `router:online:{id}`: "1" while the router is online, TTL heartbeat_ttl
- `router:metrics:{id}`: the last metrics message as received (JSON), no TTL,
  so the last figures of an offline router stay readable

A router counts as online while `router:online:{id}` exists.
"""

import json
import logging
import time

import redis.exceptions

from .errors import StoreError
from .repeats import RepeatLimiter, repeat_suffix

log = logging.getLogger(__name__)


def heartbeat_key(router_id):
    return "router:heartbeat:" + router_id


def online_key(router_id):
    return "router:online:" + router_id


def metrics_key(router_id):
    return "router:metrics:" + router_id


class Presence:
    """Apply status and metrics messages to Redis and SQL, and read the result back."""

    def __init__(self, redis_client, store, heartbeat_ttl, clock=time.time):
        self.redis = redis_client
        self.store = store
        self.heartbeat_ttl = heartbeat_ttl
        self._clock = clock
        self._repeats = RepeatLimiter()
        # Routers this instance has marked online in SQL since their last OFFLINE.
        # Brokers that follow MQTT 5 send no retained status to shared
        # subscriptions, so a router already connected when this instance
        # starts is first seen through its metrics and registered then.
        self._registered = set()

    async def handle_message(self, router_id, kind, payload, retained):
        """Apply one message. Log and drop it when it is invalid or storage fails."""
        try:
            if kind == "metrics":
                await self._handle_metrics(router_id, payload)
            else:
                await self._handle_status(router_id, payload, retained)
        # Storage outages hit every router alike, so their warnings are
        # rate-limited together rather than once per router.
        except (redis.exceptions.RedisError, OSError) as error:
            self.warn(None, "redis", "could not store %s of router %s in Redis: %s",
                      kind, router_id, error)
        except StoreError as error:
            self.warn(None, "sql", "could not store %s of router %s: %s",
                      kind, router_id, error)

    def warn(self, router_id, reason, message, *args):
        """Log a warning about a router, once per router and reason every few minutes."""
        dropped = self._repeats.check((router_id, reason))
        if dropped is not None:
            log.warning(message + "%s", *args, repeat_suffix(dropped))

    async def _handle_metrics(self, router_id, payload):
        problem = metrics_problem(payload)
        if problem is not None:
            self.warn(router_id, "metrics", "ignored metrics of router %s: %s", router_id, problem)
            return

        now = self._clock()
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(heartbeat_key(router_id), "%d" % now, ex=self.heartbeat_ttl)
            pipe.set(online_key(router_id), "1", ex=self.heartbeat_ttl)
            pipe.set(metrics_key(router_id), payload)
            await pipe.execute()

        if router_id not in self._registered:
            await self.store.mark_online(router_id, now)
            self._registered.add(router_id)
            log.info("router %s is online (first metrics seen by this instance)", router_id)

    async def _handle_status(self, router_id, payload, retained):
        try:
            text = payload.decode("utf-8").strip()
        except UnicodeDecodeError:
            text = None
        origin = " (retained)" if retained else ""

        if text == "ONLINE":
            now = self._clock()
            await self.store.mark_online(router_id, now)
            self._registered.add(router_id)
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.set(heartbeat_key(router_id), "%d" % now, ex=self.heartbeat_ttl)
                pipe.set(online_key(router_id), "1", ex=self.heartbeat_ttl)
                await pipe.execute()
            log.info("router %s is online%s", router_id, origin)
        elif text == "OFFLINE":
            # NOTE: with several instances, a metrics message that another
            # instance handles just after this one can set the keys again, so
            # the router then reads as online until heartbeat_ttl runs out.
            self._registered.discard(router_id)
            await self.redis.delete(heartbeat_key(router_id), online_key(router_id))
            await self.store.mark_offline(router_id)
            log.info("router %s is offline%s", router_id, origin)
        elif text == "":
            # An empty retained message is how a retained status is deleted.
            log.debug("router %s: empty status message ignored", router_id)
        else:
            self.warn(router_id, "status", "ignored status of router %s: expected ONLINE or "
                      "OFFLINE, got %r", router_id, payload[:64])

    async def is_online(self, router_id):
        return bool(await self.redis.exists(online_key(router_id)))

    async def online_map(self, router_ids):
        """Return {router id: online?} with one Redis round trip."""
        if not router_ids:
            return {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for router_id in router_ids:
                pipe.exists(online_key(router_id))
            results = await pipe.execute()
        return {router_id: bool(found) for router_id, found in zip(router_ids, results)}

    async def read(self, router_id):
        """Return (online, last heartbeat time or None, last metrics message or None)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.exists(online_key(router_id))
            pipe.get(heartbeat_key(router_id))
            pipe.get(metrics_key(router_id))
            online, heartbeat, metrics = await pipe.execute()
        heartbeat = int(heartbeat) if heartbeat and heartbeat.isdigit() else None
        try:
            metrics = json.loads(metrics) if metrics else None
        except ValueError:
            metrics = None
        return bool(online), heartbeat, metrics


def metrics_problem(payload):
    """Return why a metrics payload is invalid, or None when it can be stored."""
    try:
        message = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as error:
        return "the payload is not JSON (%s): %r" % (error, payload[:64])
    if not isinstance(message, dict):
        return "the payload is JSON but not an object: %r" % payload[:64]
    if message.get("type", "metrics") != "metrics":
        return "the type is %r, expected 'metrics'" % message.get("type")
    if not isinstance(message.get("metrics"), dict):
        return "the key 'metrics' is missing or not an object"
    return None
