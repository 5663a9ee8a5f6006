"""The agent installed from its ipk in the QEMU stand-in router, driven through the reference API.

One guest boots for the module, and the tests run in file order. The first
ones check the installed state, status, metrics, RPC and the terminal. The
last ones cut the link, reboot the guest and cut its power, and the agent
has to recover from each (or report it) on its own.
"""

import asyncio
import json
import re
import time

import pytest

from harness import Expect, MqttObserver, RefApi, fresh_status, terminal_session, wait_until
from routers import GuestRouter
from spotfi_agent import __version__

pytestmark = pytest.mark.qemu

ROUTER_ID = "qemu-guest-1"
KEEPALIVE = 10
METRICS_INTERVAL = 5
STATUS_TOPIC = "spotfi/router/%s/status" % ROUTER_ID
METRICS_TOPIC = "spotfi/router/%s/metrics" % ROUTER_ID
# mosquitto 2.0 logs each accepted connection as "New client connected from
# <address> as <client id> (...)".
CONNECTED_LOG = " as router-%s (" % ROUTER_ID

GUEST_HANDLERS = {"handlers": [
    {"path": "guest", "method": "version", "command": ["cat", "/proc/version"], "timeout": 10},
    {"path": "guest", "method": "hostname", "command": ["uname", "-n"], "timeout": 10},
]}


@pytest.fixture(scope="module")
def setup(qemu_image, mosquitto, redis_server, tmp_path_factory):
    """A reference API and one guest router with the agent enabled at boot."""
    workdir = tmp_path_factory.mktemp("agent-guest")
    router = GuestRouter(workdir / "router", ROUTER_ID, mosquitto.port,
                         options={"keepalive": str(KEEPALIVE),
                                  "metrics_interval": str(METRICS_INTERVAL)})
    router.add_handler_file("guest.json", GUEST_HANDLERS)
    api = RefApi(workdir, mosquitto.port, redis_server.port, instance_id="qemu-guest-api").start()
    try:
        router.start()
        wait_until(lambda: api_status(api) == "online", 60, interval=0.2,
                   message="guest router online in the API")
        yield api, router
    finally:
        router.close()
        api.stop()


def api_status(api):
    return api.request("GET", "/routers/" + ROUTER_ID)[1].get("status")


def broker_log(service):
    with open(service.log_path, encoding="utf-8", errors="replace") as handle:
        return handle.read()


def agent_info(api):
    status, body = api.rpc(ROUTER_ID, "spotfi.agent", "info")
    assert status == 200, body
    return body["result"]


def test_agent_installed_as_package(setup):
    api, router = setup
    package_files = router.shell("cat /usr/lib/opkg/info/spotfi-agent.list").split()

    assert "Configuring spotfi-agent" in router.install_output.stdout
    assert "/usr/bin/spotfi-agent" in package_files
    assert "/etc/init.d/spotfi-agent" in package_files
    assert router.shell("readlink /etc/rc.d/S99spotfi-agent").strip() == "../init.d/spotfi-agent"
    assert router.shell("/etc/init.d/spotfi-agent running; echo $?").strip() == "0"
    # The postinst ran the migration script, which went once it exited 0.
    assert router.shell("test -e /etc/uci-defaults/90-spotfi-agent-migrate; echo $?").strip() == "1"
    assert router.shell("ls -l /etc/config/spotfi").startswith("-rw-------")


def test_agent_process_runs_entry_point(setup):
    api, router = setup
    pid = router.agent_pid()

    cmdline = router.shell("tr '\\0' ' ' < /proc/%d/cmdline" % pid)

    assert cmdline == "/usr/bin/python3 /usr/bin/spotfi-agent run "


def test_online_retained_after_boot(setup, mosquitto):
    api, router = setup

    assert fresh_status(mosquitto.port, ROUTER_ID) == ("ONLINE", True)
    assert api_status(api) == "online"


def test_metrics_match_guest_proc(setup, mosquitto):
    api, router = setup
    observer = MqttObserver(mosquitto.port, [METRICS_TOPIC])
    try:
        payload, _ = observer.wait_for(METRICS_TOPIC, timeout=3 * METRICS_INTERVAL + 10)
        received = time.monotonic()
    finally:
        observer.close()
    metrics = json.loads(payload)["metrics"]

    proc = router.shell("cat /proc/uptime; grep '^MemTotal:' /proc/meminfo").split()
    read = time.monotonic()
    guest_uptime_at_receipt = float(proc[0]) - (read - received)
    mem_total = int(proc[3]) * 1024

    # The agent truncates the uptime to whole seconds and collects it a
    # moment before publishing.
    assert abs(int(metrics["uptime"]) - guest_uptime_at_receipt) <= 3.0
    assert metrics["totalMemory"] == mem_total
    assert 0 < metrics["freeMemory"] <= mem_total
    assert metrics["source"] == ("proc" if router.openwrt is None else "ubus")
    assert "eth0" in metrics["interfaces"]
    assert metrics["agentVersion"] == __version__


def test_rpc_agent_info(setup):
    api, router = setup

    info = agent_info(api)

    assert info["routerId"] == ROUTER_ID
    assert info["version"] == __version__
    assert info["runtime"] == "cpython"
    assert "10.0.2.100:1883" in info["broker"]
    assert [(handler["path"], handler["method"]) for handler in info["handlers"]] == [
        ("guest", "hostname"), ("guest", "version")]


def test_rpc_handler_runs_guest_commands(setup):
    api, router = setup

    version_status, version = api.rpc(ROUTER_ID, "guest", "version")
    hostname_status, hostname = api.rpc(ROUTER_ID, "guest", "hostname")

    assert version_status == 200, version
    assert version["result"].strip() == router.shell("cat /proc/version").strip()
    assert version["result"].startswith("Linux version ")
    assert hostname_status == 200, hostname
    assert hostname["result"].strip() == router.shell("uname -n").strip()
    if router.openwrt is None:
        assert hostname["result"].strip() == "spotfi-qemu"


def test_terminal_shell_is_guest_shell(setup):
    api, router = setup
    boot_id = router.shell("cat /proc/sys/kernel/random/boot_id").strip().encode()
    # The shell reads its first line only after its prompt, so each step
    # waits for the output of the one before.
    commands = [Expect(b"# "), b"stty size\n", Expect(b"30 100"),
                {"type": "resize", "cols": 120, "rows": 40},
                b"stty size; cat /proc/sys/kernel/random/boot_id\n"]

    output, controls = asyncio.run(terminal_session(
        api.url, ROUTER_ID, commands, cols=100, rows=30,
        until=lambda data: b"40 120" in data and boot_id in data.split(b"boot_id", 1)[-1]))

    assert b"30 100" in output
    assert b"40 120" in output
    assert output.index(b"30 100") < output.index(b"40 120")
    assert boot_id in output


def test_link_down_gives_offline_then_online(setup, mosquitto):
    api, router = setup
    observer = MqttObserver(mosquitto.port, [STATUS_TOPIC])
    try:
        observer.wait_for(STATUS_TOPIC, lambda payload: payload == b"ONLINE")
        cut = time.monotonic()
        router.guest.set_link(False)
        try:
            # The broker gives up 1.5 keepalives after the last packet it got,
            # and mosquitto 2.0 checks keepalives every 6 s.
            observer.wait_for(STATUS_TOPIC, lambda payload: payload == b"OFFLINE",
                              timeout=1.5 * KEEPALIVE + 10)
            offline_after = time.monotonic() - cut
        finally:
            router.guest.set_link(True)
        restored = time.monotonic()
        wait_until(lambda: observer.on(STATUS_TOPIC)[-1][0] == b"ONLINE", 90, interval=0.1,
                   message="ONLINE after the link came back")
        online_after = time.monotonic() - restored
    finally:
        observer.close()
    print("link down: OFFLINE after %.1f s; link up: ONLINE after %.1f s"
          % (offline_after, online_after))

    # The agent sends a packet at least every 0.75 keepalive, so the broker
    # cannot time it out within half a keepalive of the cut.
    assert offline_after >= 0.5 * KEEPALIVE
    assert "Client router-%s has exceeded timeout" % ROUTER_ID in broker_log(mosquitto)
    assert fresh_status(mosquitto.port, ROUTER_ID) == ("ONLINE", True)
    assert agent_info(api)["connections"] >= 2


def test_reboot_agent_comes_back(setup, mosquitto):
    api, router = setup
    old_boot_id = router.guest.boot_id
    log_before = len(broker_log(mosquitto))
    observer = MqttObserver(mosquitto.port, [STATUS_TOPIC])
    try:
        observer.wait_for(STATUS_TOPIC, lambda payload: payload == b"ONLINE")

        router.guest.reboot()

        wait_until(lambda: CONNECTED_LOG in broker_log(mosquitto)[log_before:], 60,
                   interval=0.2, message="a new connection of the agent after the reboot")
        wait_until(lambda: [payload for payload, _ in observer.on(STATUS_TOPIC)][-2:]
                   == [b"OFFLINE", b"ONLINE"], 30, interval=0.1,
                   message="OFFLINE at shutdown, then ONLINE")
    finally:
        observer.close()
    info = agent_info(api)
    broker_lines = broker_log(mosquitto)[log_before:]

    assert router.guest.boot_id != old_boot_id
    assert info["connections"] == 1
    assert info["uptime"] < router.guest.boot_seconds + 30
    assert fresh_status(mosquitto.port, ROUTER_ID) == ("ONLINE", True)
    # rcK stopped the agent, which sent OFFLINE and DISCONNECT itself.
    assert "Client router-%s disconnected." % ROUTER_ID in broker_lines
    assert broker_lines.count(CONNECTED_LOG) == 1


def test_power_cut_gives_retained_offline(setup, mosquitto):
    api, router = setup
    wait_until(lambda: fresh_status(mosquitto.port, ROUTER_ID)[0] == "ONLINE", 30,
               message="ONLINE before the power cut")

    started = time.monotonic()
    router.guest.kill()
    killed = time.monotonic()
    wait_until(lambda: fresh_status(mosquitto.port, ROUTER_ID) == ("OFFLINE", True), 1.0,
               interval=0.05, message="retained OFFLINE within a second of the power cut")
    print("power cut: kill() took %.2f s, retained OFFLINE %.2f s after it returned"
          % (killed - started, time.monotonic() - killed))

    assert re.search(r"Client router-%s closed its connection" % ROUTER_ID, broker_log(mosquitto))
