"""Parse MQTT broker addresses as operators write them.

Accepted forms: mqtt://host[:port], mqtts://host[:port], tcp:// and ssl://
(the Go bridge's spelling of mqtt:// and mqtts://), host:port, a bare host,
and [IPv6 address] with or without a port. A trailing "/" is allowed. Any
other path, a query or a fragment is dropped with a warning, because MQTT
connections have no use for them. Without a port, 1883 is used for plain MQTT
and 8883 for TLS.
"""

from spotfi_agent.config import invalid_setting
from spotfi_agent.log import get_logger

log = get_logger(__name__)

PLAIN_PORT = 1883
TLS_PORT = 8883

_TLS_BY_SCHEME = {"mqtt": False, "tcp": False, "mqtts": True, "ssl": True}
_SCHEMES_HINT = "use mqtt://, mqtts://, tcp:// or ssl://"
_HOST_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._"
_IPV6_CHARS = "0123456789abcdefABCDEF:."
_ZONE_CHARS = _HOST_CHARS
_DIGITS = "0123456789"
_SETTING = "broker"


class BrokerURL:
    """One broker: `host`, `port`, `tls` and `display`, e.g. "mqtts://host:8883"."""

    def __init__(self, host, port, tls):
        self.host = host
        self.port = port
        self.tls = tls
        shown_host = "[%s]" % host if ":" in host else host
        self.display = "%s://%s:%d" % ("mqtts" if tls else "mqtt", shown_host, port)

    def __str__(self):
        return self.display

    def __repr__(self):
        return "BrokerURL(%r, %d, %r)" % (self.host, self.port, self.tls)

    def __eq__(self, other):
        return (isinstance(other, BrokerURL) and self.host == other.host
                and self.port == other.port and self.tls == other.tls)

    def __ne__(self, other):
        return not self.__eq__(other)

    def __hash__(self):
        return hash((self.host, self.port, self.tls))


def _only_chars(text, allowed):
    for char in text:
        if char not in allowed:
            return False
    return True


def _first_index(text, chars):
    first = len(text)
    for char in chars:
        index = text.find(char)
        if 0 <= index < first:
            first = index
    return first


def _parse_port(value, text, source):
    if not text or not _only_chars(text, _DIGITS):
        raise invalid_setting(_SETTING, value, "invalid port '%s' (use a number from 1 to 65535)"
                              % text, source)
    port = int(text)
    if not 1 <= port <= 65535:
        raise invalid_setting(_SETTING, value, "port %d out of range 1-65535" % port, source)
    return port


def _split_ipv6(value, authority, source):
    end = authority.find("]")
    if end < 0:
        raise invalid_setting(_SETTING, value, "missing ']' after the IPv6 address", source)
    host = authority[1:end]
    address = host
    zone = host.find("%")
    if zone >= 0:
        address = host[:zone]
        if not _only_chars(host[zone + 1:], _ZONE_CHARS) or zone == len(host) - 1:
            raise invalid_setting(_SETTING, value, "invalid IPv6 zone", source)
    if ":" not in address or not _only_chars(address, _IPV6_CHARS):
        raise invalid_setting(_SETTING, value, "invalid IPv6 address '%s'" % host, source)
    rest = authority[end + 1:]
    if not rest:
        return host, None
    if not rest.startswith(":"):
        raise invalid_setting(_SETTING, value, "unexpected text after ']'", source)
    return host, rest[1:]


def _split_host_port(value, authority, source):
    """Return (host, port text or None) of `host[:port]` or `[ipv6][:port]`."""
    if authority.startswith("["):
        return _split_ipv6(value, authority, source)
    if authority.count(":") > 1:
        raise invalid_setting(_SETTING, value, "write an IPv6 address in brackets, "
                              "e.g. mqtt://[2001:db8::1]:1883", source)
    colon = authority.find(":")
    if colon < 0:
        host, port_text = authority, None
    else:
        host, port_text = authority[:colon], authority[colon + 1:]
    if not host:
        raise invalid_setting(_SETTING, value, "empty host name", source)
    if not _only_chars(host, _HOST_CHARS) or host.startswith(".") or ".." in host:
        raise invalid_setting(_SETTING, value, "invalid host name '%s'" % host, source)
    return host, port_text


def parse_broker(value, source=None):
    """Parse one broker address into a BrokerURL, or raise ConfigError when invalid.

    `source` names where the value came from, for the error message.
    """
    text = value.strip()
    if not text:
        raise invalid_setting(_SETTING, value, "empty broker address", source)
    for char in text:
        if char.isspace() or ord(char) < 32 or ord(char) == 127:
            raise invalid_setting(_SETTING, value, "contains whitespace or a control character",
                                  source)

    scheme_end = text.find("://")
    if scheme_end >= 0:
        scheme = text[:scheme_end].lower()
        if scheme not in _TLS_BY_SCHEME:
            raise invalid_setting(_SETTING, value, "unsupported scheme '%s' (%s)"
                                  % (scheme, _SCHEMES_HINT), source)
        tls = _TLS_BY_SCHEME[scheme]
        rest = text[scheme_end + 3:]
    else:
        scheme = None
        tls = False
        rest = text

    cut = _first_index(rest, "/?#")
    authority = rest[:cut]
    dropped = rest[cut:]
    if "@" in authority:
        # The agent logs in with router id and token. The value may contain a
        # password, so only the part after "@" is shown.
        raise invalid_setting(_SETTING, "…@" + authority[authority.rfind("@") + 1:],
                              "user name or password in the URL (the agent logs in with "
                              "its router id and token); remove the part before '@'", source)
    if not authority:
        raise invalid_setting(_SETTING, value, "empty host name", source)
    host, port_text = _split_host_port(value, authority, source)
    if port_text is None:
        port = TLS_PORT if tls else PLAIN_PORT
    else:
        port = _parse_port(value, port_text, source)

    if dropped and dropped != "/":
        log.warning("broker URL '%s': path, query and fragment '%s' dropped, because MQTT "
                    "does not use them", text, dropped)
    if scheme is None and port == TLS_PORT:
        log.warning("broker '%s' has no scheme, so plain MQTT is used on port %d. Write "
                    "mqtts://%s for TLS", text, port, authority)
    return BrokerURL(host, port, tls)


def parse_broker_list(value, source=None):
    """Parse a broker setting into a list of BrokerURL in failover order.

    `value` is a string of comma-separated addresses, or a list of them
    (a UCI `list`). Empty items are skipped. Raises ConfigError when an
    address is invalid or none is given.
    """
    items = value if isinstance(value, list) else [value]
    brokers = []
    for item in items:
        for part in item.split(","):
            if not part.strip():
                continue
            broker = parse_broker(part, source)
            if broker in brokers:
                log.warning("broker %s listed twice, the second entry is ignored",
                            broker.display)
                continue
            brokers.append(broker)
    if not brokers:
        raise invalid_setting(_SETTING, value, "no broker address", source)
    return brokers
