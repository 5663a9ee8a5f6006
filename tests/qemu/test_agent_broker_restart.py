"""The agent in the QEMU stand-in router when its broker restarts.

The module has a mosquitto of its own on a fixed port, which QEMU forwards
the guest's broker address to, so stopping and starting it keeps the
address the agent and the reference API connect to.
"""

import re
import time

import pytest

import localservices
from harness import RefApi, fresh_status, wait_until
from routers import GuestRouter

pytestmark = pytest.mark.qemu

ROUTER_ID = "qemu-restart-1"
BROKER_DOWN_SECONDS = 6


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    service = localservices.mosquitto(str(tmp_path_factory.mktemp("restart-broker")),
                                      port=localservices.free_port())
    service.start()
    yield service
    service.stop()


@pytest.fixture(scope="module")
def setup(qemu_image, broker, redis_server, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("broker-restart")
    router = GuestRouter(workdir / "router", ROUTER_ID, broker.port)
    api = RefApi(workdir, broker.port, redis_server.port, instance_id="qemu-restart-api").start()
    try:
        router.start()
        wait_until(lambda: fresh_status(broker.port, ROUTER_ID)[0] == "ONLINE", 60, interval=0.2,
                   message="guest router ONLINE")
        yield api, router
    finally:
        router.close()
        api.stop()


def retained_online(port):
    """Return True when a fresh subscriber gets a retained ONLINE; a restarted broker has none at first."""
    try:
        return fresh_status(port, ROUTER_ID, timeout=1.0) == ("ONLINE", True)
    except AssertionError:
        return False


def test_broker_restart_reconnects_with_backoff(setup, broker):
    api, router = setup
    port = broker.port

    broker.stop()
    time.sleep(BROKER_DOWN_SECONDS)
    broker.start()
    restarted = time.monotonic()
    wait_until(lambda: retained_online(broker.port), 60, interval=0.2,
               message="ONLINE after the broker restart")
    online_after = time.monotonic() - restarted
    # The reference API reconnects with a backoff of its own.
    status, body = wait_until(
        lambda: (lambda reply: reply if reply[0] == 200 else None)(
            api.rpc(ROUTER_ID, "spotfi.agent", "info", timeout=5)), 60, interval=0.5,
        message="RPC answered through the API after the broker restart")
    log = router.log_text()
    delays = [float(delay) for delay in re.findall(r"next attempt at \S+ in ([0-9.]+) s", log)]
    print("broker back: ONLINE after %.1f s; retry delays %s" % (online_after, delays))

    assert broker.port == port
    assert "connection to mqtt://10.0.2.100:1883 lost" in log
    assert len(delays) >= 2
    # Exponential backoff with full jitter: no delay exceeds 2**attempt s.
    assert all(delay <= 2.0 ** (attempt + 1) for attempt, delay in enumerate(delays))
    assert body["status"] == "success"
    assert body["result"]["connections"] == 2
