"""Choose the MQTT transport and build its TLS context.

`native` (the default) is spotfi_agent.mqtt, which runs everywhere.
`paho` wraps paho-mqtt for sites that prefer it; it costs about 12 MB more
RSS on CPython 3.11 (see docs/benchmarks.md) and is CPython only.
"""

from spotfi_agent.compat import MICROPYTHON
from spotfi_agent.log import get_logger

log = get_logger(__name__)

TRANSPORTS = ("native", "paho")


class TransportError(Exception):
    """Raised when the configured transport cannot be used on this runtime."""


def create_client(name, loop, client_id, keepalive, username, password, mqtt_version="5"):
    if name == "paho":
        try:
            from spotfi_agent.paho_transport import PahoClient
        except ImportError as error:
            if MICROPYTHON:
                raise TransportError("transport 'paho' runs on CPython only; set `uci set "
                                     "spotfi.main.transport=native` or install the packages "
                                     "spotfi-agent and spotfi-agent-paho instead of "
                                     "spotfi-agent-mpy")
            raise TransportError("transport 'paho' cannot be loaded (%s); install it with `opkg "
                                 "install spotfi-agent-paho`, which also installs "
                                 "python3-paho-mqtt, or set `uci set "
                                 "spotfi.main.transport=native`" % error)
        return PahoClient(loop, client_id, keepalive, username, password,
                          mqtt_version=mqtt_version)
    if name != "native":
        raise TransportError("unknown transport %r; use one of: %s" % (name, ", ".join(TRANSPORTS)))
    from spotfi_agent.mqtt import MqttClient
    return MqttClient(loop, client_id, keepalive, username, password, mqtt_version=mqtt_version)


def tls_context(settings, broker):
    """Return an ssl.SSLContext for a TLS broker, None for a plain one.

    The server certificate and host name are always checked: against
    `ca_file` when set, else the system's CA store.
    """
    if not broker.tls:
        return None
    if MICROPYTHON:
        return _micropython_tls_context(settings)
    import ssl
    ca_file = settings.paths.system(settings.ca_file) if settings.ca_file else None
    context = ssl.create_default_context(cafile=ca_file)
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    if settings.cert_file:
        key_file = settings.paths.system(settings.key_file) if settings.key_file else None
        context.load_cert_chain(settings.paths.system(settings.cert_file), key_file)
    return context


def _micropython_tls_context(settings):
    from spotfi_agent import mpytls

    system = settings.paths.system
    if settings.ca_file:
        ca_file = system(settings.ca_file)
    else:
        ca_file = mpytls.find_system_ca_file(system)
        if ca_file is None:
            raise ValueError("no CA certificates found in %s; install ca-bundle or set ca_file"
                             % " or ".join(mpytls.SYSTEM_CA_FILES))
    cert_file = system(settings.cert_file) if settings.cert_file else None
    key_file = system(settings.key_file) if settings.key_file else None
    return mpytls.client_context(ca_file, cert_file, key_file)
