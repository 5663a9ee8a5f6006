"""The running agent: wires the session, metrics, RPC and terminal onto one loop."""

import os
import time

from spotfi_agent import __version__
from spotfi_agent import jsoncodec
from spotfi_agent import transport
from spotfi_agent.compat import MICROPYTHON, path_join, signal
from spotfi_agent.log import get_logger
from spotfi_agent.loop import Loop
from spotfi_agent.metrics import MetricsCollector
from spotfi_agent.session import Session
from spotfi_agent.topics import Topics

log = get_logger(__name__)

# A clean shutdown must end within 2 s of SIGTERM, OFFLINE included, because
# procd sends SIGKILL soon after.
SHUTDOWN_DEADLINE = 1.8


class Agent:
    """One router's agent; run() blocks until a stop signal and returns the exit status."""

    def __init__(self, settings, loop=None):
        self.settings = settings
        self.loop = loop or Loop()
        self.router_id = settings.router_id
        self.topics = Topics(self.router_id)
        self.started_at = time.time()
        self.exit_status = 0
        self._stopping = False

        self.client = transport.create_client(
            settings.transport, self.loop, "router-" + self.router_id, settings.keepalive,
            self.router_id, settings.token, settings.mqtt_version)
        self.session = Session(self.loop, self.client, settings.brokers, self.topics,
                               self._tls_context)
        self.session.on_online = self._on_online
        self.session.on_message = self._on_message

        self.metrics = MetricsCollector(self.loop, self.path("/proc"), settings.ubus, self.router_id)
        self._metrics_timer = None
        self.rpc = self._create_rpc()
        # The terminal code is loaded with the first x/in message: most routers
        # never open a terminal, and it costs about 0.4 MB of RSS on CPython.
        self.tunnel = None

    def _create_rpc(self):
        from spotfi_agent.rpc import RpcDispatcher
        return RpcDispatcher(self)

    def _create_tunnel(self):
        from spotfi_agent.tunnel import TunnelManager
        return TunnelManager(self)

    # The context interface used by the RPC dispatcher and the tunnel.

    def path(self, absolute):
        """Return `absolute` under the configured root (tests run against fake trees)."""
        root = getattr(self.settings, "root", "/") or "/"
        if root == "/":
            return absolute
        return path_join(root, absolute.lstrip("/"))

    def publish(self, topic, payload, qos=0, retain=False, properties=None):
        """Publish through the session's client; `properties` as MqttClient.publish takes them."""
        return self.client.publish(topic, payload, qos, retain, properties)

    @property
    def outgoing_bytes(self):
        return self.client.outgoing_bytes

    @property
    def connected(self):
        return self.session.online

    def agent_info(self):
        return {
            "version": __version__,
            "routerId": self.router_id,
            "runtime": "micropython" if MICROPYTHON else "cpython",
            "transport": self.settings.transport,
            "broker": self.session.broker.display,
            "uptime": int(time.time() - self.started_at),
            "connections": self.session.connections,
            "tunnelSessions": self.tunnel.session_count if self.tunnel is not None else 0,
            "handlers": self.rpc.list_handlers(),
        }

    # Lifecycle.

    def _tls_context(self, broker):
        return transport.tls_context(self.settings, broker)

    def _on_online(self):
        self.send_metrics()

    def _on_message(self, topic, payload, properties):
        if topic == self.topics.rpc_request:
            self.rpc.handle(payload, properties)
        elif topic == self.topics.x_in:
            if self.tunnel is None:
                self.tunnel = self._create_tunnel()
            self.tunnel.handle(payload)
        else:
            log.warning("router %s: message on unexpected topic %s ignored", self.router_id, topic)

    def send_metrics(self):
        if not self.session.online:
            return
        extras = {"agentVersion": __version__, "reconnects": max(0, self.session.connections - 1)}
        self.metrics.collect(self._publish_metrics, extras)

    def _publish_metrics(self, payload):
        if self.session.online:
            self.client.publish(self.topics.metrics, jsoncodec.dumps(payload), 0, False)

    def _metrics_tick(self):
        # The timer runs whether or not a connection is up, so heartbeats keep
        # their rhythm across reconnects.
        self._metrics_timer = self.loop.call_later(self.settings.metrics_interval, self._metrics_tick)
        self.send_metrics()

    def start(self):
        log.info("router %s: spotfi-agent %s starting (transport %s, brokers %s)", self.router_id,
                 __version__, self.settings.transport,
                 ", ".join(broker.display for broker in self.settings.brokers))
        self.session.start()
        self._metrics_timer = self.loop.call_later(self.settings.metrics_interval, self._metrics_tick)

    def stop(self, reason="signal"):
        """Close terminals, publish OFFLINE, disconnect; the loop ends when done."""
        if self._stopping:
            return
        self._stopping = True
        log.info("router %s: stopping (%s)", self.router_id, reason)
        if self._metrics_timer is not None:
            self._metrics_timer.cancel()
        if self.tunnel is not None:
            self.tunnel.close_all("shutdown")
        self.rpc.close()
        self.loop.call_later(SHUTDOWN_DEADLINE, self._force_stop)
        self.session.stop(self._stopped)

    def _stopped(self):
        log.info("router %s: disconnected, exiting", self.router_id)
        self.loop.stop()

    def _force_stop(self):
        log.warning("router %s: clean shutdown took over %.1f s, closing the connection",
                    self.router_id, SHUTDOWN_DEADLINE)
        self.client.abort("shutdown deadline")
        self.loop.stop()

    def run(self):
        self.start()
        _install_signal_handlers(self)
        self.loop.run()
        return self.exit_status


def _install_signal_handlers(agent):
    """Stop the agent on SIGTERM and SIGINT, waking the loop through a pipe."""
    if signal is None:
        # NOTE: MicroPython's unix port has no signal module, so SIGTERM (as
        # procd sends it) ends the agent at once by its default action. The
        # kernel then closes the socket and the broker publishes the Last Will
        # OFFLINE, but no clean DISCONNECT is sent.
        log.info("router %s: no signal module: SIGTERM ends the agent at once and the broker"
                 " publishes the Last Will OFFLINE", agent.router_id)
        return

    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd)

    def drain():
        try:
            os.read(read_fd, 512)
        except OSError:
            pass

    agent.loop.add_reader(read_fd, drain)

    def handler(signum, frame):
        agent.loop.call_soon(agent.stop, "signal %d" % signum)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
