"""`spotfi-agent check`: try one MQTT connection with the configured settings."""

import sys

from spotfi_agent import transport
from spotfi_agent.compat import monotonic
from spotfi_agent.loop import Loop

CHECK_TIMEOUT = 15.0


def check_connection(settings, out=None, err=None):
    """Connect to each broker in turn until one accepts; return the exit status.

    The client id is `router-{id}-check`, so checking a router that runs the
    agent does not disconnect it. No Last Will is set and nothing is published.
    """
    out = out or sys.stdout
    err = err or sys.stderr
    loop = Loop()
    failures = []
    for broker in settings.brokers:
        try:
            client = transport.create_client(settings.transport, loop,
                                             "router-%s-check" % settings.router_id,
                                             settings.keepalive, settings.router_id, settings.token,
                                             settings.mqtt_version)
            context = transport.tls_context(settings, broker)
        except (transport.TransportError, OSError, ValueError) as error:
            err.write("spotfi-agent: check failed: %s\n" % error)
            return 2
        outcome = {}
        started = monotonic()

        def connected(session_present, client=client):
            outcome["ok"] = True
            client.disconnect()

        def disconnected(reason, was_connected):
            outcome.setdefault("reason", reason)
            outcome["done"] = True

        client.on_connect = connected
        client.on_disconnect = disconnected
        client.connect(broker.host, broker.port, context, broker.host)
        deadline = started + CHECK_TIMEOUT
        while "done" not in outcome and monotonic() < deadline:
            loop.run_once(0.2)
        elapsed_ms = (monotonic() - started) * 1000.0
        if outcome.get("ok"):
            out.write("OK: connected to %s as router %s with MQTT %s in %.0f ms\n"
                      % (broker.display, settings.router_id, client.protocol_version, elapsed_ms))
            return 0
        client.abort("check timed out")
        failures.append("%s: %s" % (broker.display, outcome.get("reason", "timed out")))
    hint = ""
    # MQTT 3.1.1 return codes 4 and 5, and MQTT 5 reason codes 0x86 and 0x87.
    credential_codes = ("CONNACK code 4", "CONNACK code 5", "reason code 0x86", "reason code 0x87")
    if any(code in failure for failure in failures for code in credential_codes):
        hint = "; check the token (option token) and the router id, which is the MQTT username"
    err.write("spotfi-agent: check failed: %s%s\n" % ("; ".join(failures), hint))
    return 1
