"""One reference API instance: SQL store, Redis, MQTT broker link and HTTP server together."""

import asyncio
import logging
import signal

import redis.asyncio
from aiohttp import web

from . import topics
from .broker import Broker
from .presence import Presence
from .repeats import RepeatLimiter, repeat_suffix
from .rpc import RpcCaller
from .store import Store
from .terminal import TerminalRegistry
from .web import build_app

log = logging.getLogger(__name__)

# Status and metrics messages that may wait for Redis and SQL. Newer ones are
# dropped and logged, so that a storage outage cannot exhaust memory.
PRESENCE_QUEUE_SIZE = 10000
HTTP_SHUTDOWN_TIMEOUT = 5.0
REDIS_TIMEOUT = 5.0


class Service:
    """All parts of one instance, started and stopped together.

    `port` is the bound HTTP port once `start()` has returned.
    """

    def __init__(self, settings):
        self.settings = settings
        self.store = Store(settings.database)
        self.redis = redis.asyncio.Redis.from_url(settings.redis_url, decode_responses=True,
                                                  socket_timeout=REDIS_TIMEOUT,
                                                  socket_connect_timeout=REDIS_TIMEOUT)
        self.presence = Presence(self.redis, self.store, settings.heartbeat_ttl)
        self.broker = Broker(settings.broker, settings.instance_id, self._on_message)
        self.rpc = RpcCaller(self.broker, settings.instance_id, settings.rpc_grace)
        self.terminals = TerminalRegistry(settings.instance_id)
        self.port = None

        self._presence_queue = asyncio.Queue(maxsize=PRESENCE_QUEUE_SIZE)
        self._presence_task = None
        self._runner = None
        self._repeats = RepeatLimiter()

    async def start(self):
        """Open the database (StoreError when it fails), then connect and listen."""
        await self.store.open()
        log.info("instance %s: %s database %s ready", self.settings.instance_id,
                 self.settings.database.dialect, self.settings.database.url)
        self._presence_task = asyncio.create_task(self._apply_presence(), name="presence")
        self.broker.start()

        app = build_app(self)
        app.on_shutdown.append(self._close_terminals)
        self._runner = web.AppRunner(app, shutdown_timeout=HTTP_SHUTDOWN_TIMEOUT,
                                     access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.host, self.settings.port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        log.info("instance %s: listening on http://%s:%d", self.settings.instance_id,
                 self.settings.host, self.port)

    async def stop(self):
        """Close terminals and HTTP first, while the broker can still carry x-stop."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.broker.stop()
        if self._presence_task is not None:
            self._presence_task.cancel()
            await asyncio.gather(self._presence_task, return_exceptions=True)
            self._presence_task = None
        await self.redis.aclose()
        await self.store.close()
        log.info("instance %s: stopped", self.settings.instance_id)

    async def _close_terminals(self, app):
        self.terminals.fail_all("shutdown", "the API instance %s is shutting down"
                                % self.settings.instance_id)

    def _on_message(self, topic, payload, retained):
        parsed = topics.parse_topic(topic)
        if parsed is None:
            self._warn(topic, "ignored a message on the unexpected topic %s", topic)
            return
        problem = topics.router_id_problem(parsed.router_id)
        if problem is not None:
            self._warn(topic, "ignored a message on topic %s: %s", topic, problem)
            return

        if parsed.kind in ("metrics", "status"):
            try:
                self._presence_queue.put_nowait((parsed.router_id, parsed.kind, payload,
                                                 retained))
            except asyncio.QueueFull:
                self._warn("queue", "dropped %s of router %s: %d status and metrics messages "
                           "wait for Redis and SQL", parsed.kind, parsed.router_id,
                           PRESENCE_QUEUE_SIZE)
        elif parsed.kind == "rpc/response":
            self.rpc.handle_result(parsed, payload)
        else:
            self.terminals.handle_message(parsed, payload)

    async def _apply_presence(self):
        # One worker keeps each router's status and metrics in arrival order.
        while True:
            router_id, kind, payload, retained = await self._presence_queue.get()
            try:
                await self.presence.handle_message(router_id, kind, payload, retained)
            except Exception:
                log.exception("router %s: failed to apply a %s message", router_id, kind)

    def _warn(self, key, message, *args):
        dropped = self._repeats.check(key)
        if dropped is not None:
            log.warning(message + "%s", *args, repeat_suffix(dropped))


async def run(settings):
    """Run one instance until SIGINT or SIGTERM."""
    service = Service(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for number in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(number, stop.set)
    try:
        await service.start()
        await stop.wait()
        log.info("instance %s: stopping on signal", settings.instance_id)
    finally:
        await service.stop()
