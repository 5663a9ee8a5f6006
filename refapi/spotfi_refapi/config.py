"""Settings of the reference API from environment variables and command-line flags.

Each option has an environment variable and a flag, and the flag wins. Invalid
values raise ConfigError with a one-line message that names the option, quotes
the value and states what is expected.
"""

import argparse
import dataclasses
import logging
import re
import secrets
import urllib.parse

from .errors import ConfigError

DEFAULT_MQTT_BROKER_URL = "mqtt://127.0.0.1:1883"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_DATABASE_URL = "sqlite:///spotfi-refapi.db"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_METRICS_INTERVAL = 30

# Instance ids become one MQTT topic level, so they exclude '/', '+' and '#'.
INSTANCE_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

MQTT_SCHEMES = {"mqtt": False, "tcp": False, "mqtts": True, "ssl": True}
REDIS_SCHEMES = ("redis", "rediss", "unix")
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclasses.dataclass(frozen=True)
class BrokerSettings:
    """Address, TLS flag and credentials of the MQTT broker."""

    host: str
    port: int
    tls: bool
    username: str | None
    password: str | None
    url: str  # password replaced by "***", safe to log


@dataclasses.dataclass(frozen=True)
class DatabaseSettings:
    """The SQL database: a SQLite file path or a PostgreSQL conninfo URL."""

    dialect: str  # "sqlite" or "postgresql"
    target: str
    url: str  # password replaced by "***", safe to log


@dataclasses.dataclass(frozen=True)
class Settings:
    """All options of one reference API instance."""

    broker: BrokerSettings
    redis_url: str
    database: DatabaseSettings
    host: str
    port: int
    instance_id: str
    metrics_interval: int
    heartbeat_ttl: int
    log_level: str = "info"
    # Extra seconds to wait for an RPC result after the call's own timeout, so
    # that the agent's `timeout` error arrives before the API gives up.
    rpc_grace: float = 5.0
    # Seconds a terminal session may wait for `x-started` before it is closed.
    terminal_start_timeout: float = 15.0


def default_heartbeat_ttl(metrics_interval):
    """Return the heartbeat TTL in seconds: three metrics intervals, at least 90."""
    return max(90, 3 * metrics_interval)


def redact_url(url):
    """Return `url` with its password replaced by '***'."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    userinfo = netloc[0].split(":", 1)[0] + ":***"
    return urllib.parse.urlunsplit(parts._replace(netloc=userinfo + "@" + netloc[1]))


def parse_broker_url(url, source="MQTT_BROKER_URL"):
    """Parse mqtt://, tcp://, mqtts:// or ssl:// URLs with optional user:password@."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise ConfigError("invalid %s %r: %s" % (source, url, error)) from None
    if parts.scheme not in MQTT_SCHEMES:
        raise ConfigError("invalid %s %r: the scheme must be one of mqtt, mqtts, tcp, ssl"
                          % (source, url))
    if not parts.hostname:
        raise ConfigError("invalid %s %r: the host name is missing, for example "
                          "mqtt://127.0.0.1:1883" % (source, redact_url(url)))
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError("invalid %s %r: a broker URL has no path or query"
                          % (source, redact_url(url)))

    tls = MQTT_SCHEMES[parts.scheme]
    if port is None:
        port = 8883 if tls else 1883
    username = urllib.parse.unquote(parts.username) if parts.username else None
    password = urllib.parse.unquote(parts.password) if parts.password is not None else None
    return BrokerSettings(host=parts.hostname, port=port, tls=tls, username=username,
                          password=password, url=redact_url(url))


def parse_database_url(url, source="DATABASE_URL"):
    """Parse sqlite:///relative.db, sqlite:////absolute.db or postgresql://... URLs."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as error:
        raise ConfigError("invalid %s %r: %s" % (source, url, error)) from None

    if parts.scheme == "sqlite":
        # sqlite:///name.db has the empty host and the path "/name.db".
        if parts.netloc or not parts.path.startswith("/") or len(parts.path) < 2:
            raise ConfigError("invalid %s %r: use sqlite:///relative/path.db or "
                              "sqlite:////absolute/path.db" % (source, url))
        path = urllib.parse.unquote(parts.path[1:])
        if path == ":memory:":
            raise ConfigError("invalid %s %r: an in-memory database is not supported "
                              "because each query opens its own connection; give a file path"
                              % (source, url))
        return DatabaseSettings(dialect="sqlite", target=path, url=url)

    if parts.scheme in ("postgresql", "postgres"):
        if not parts.hostname and "host=" not in parts.query:
            raise ConfigError("invalid %s %r: the host name is missing, for example "
                              "postgresql://user:password@127.0.0.1:5432/spotfi"
                              % (source, redact_url(url)))
        return DatabaseSettings(dialect="postgresql", target=url, url=redact_url(url))

    raise ConfigError("invalid %s %r: the scheme must be sqlite or postgresql"
                      % (source, redact_url(url)))


def parse_redis_url(url, source="REDIS_URL"):
    """Check that `url` is a redis://, rediss:// or unix:// URL and return it."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as error:
        raise ConfigError("invalid %s %r: %s" % (source, redact_url(url), error)) from None
    if parts.scheme not in REDIS_SCHEMES:
        raise ConfigError("invalid %s %r: the scheme must be one of redis, rediss, unix"
                          % (source, redact_url(url)))
    return url


def _parse_int(value, source, minimum, maximum):
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = None
    if number is None or not minimum <= number <= maximum:
        raise ConfigError("invalid %s %r: expected an integer from %d to %d"
                          % (source, value, minimum, maximum))
    return number


class _ArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one-line ConfigErrors instead of usage text."""

    def error(self, message):
        raise ConfigError("%s (see --help)" % message)


def build_argument_parser():
    parser = _ArgumentParser(
        prog="python3 -m spotfi_refapi",
        description="Reference SpotFi API. Each flag overrides the environment "
                    "variable named in its help.")
    parser.add_argument("--mqtt-broker-url", help="MQTT broker, mqtt://[user:password@]host:port "
                        "or mqtts://... (MQTT_BROKER_URL, default %s)" % DEFAULT_MQTT_BROKER_URL)
    parser.add_argument("--redis-url", help="Redis URL (REDIS_URL, default %s)" % DEFAULT_REDIS_URL)
    parser.add_argument("--database-url", help="sqlite:///path.db or postgresql://... "
                        "(DATABASE_URL, default %s)" % DEFAULT_DATABASE_URL)
    parser.add_argument("--host", help="HTTP listen address (HOST, default %s)" % DEFAULT_HOST)
    parser.add_argument("--port", help="HTTP listen port (PORT, default %d)" % DEFAULT_PORT)
    parser.add_argument("--instance-id", help="name of this instance in its MQTT response "
                        "topics, letters, digits, '-' and '_' (INSTANCE_ID, default random hex)")
    parser.add_argument("--metrics-interval", help="seconds between two metrics messages of a "
                        "router, as the agents are configured (METRICS_INTERVAL, default %d)"
                        % DEFAULT_METRICS_INTERVAL)
    parser.add_argument("--heartbeat-ttl", help="seconds a router stays online in Redis after "
                        "its last metrics, at least twice the metrics interval "
                        "(HEARTBEAT_TTL, default max(90, 3 x metrics interval))")
    parser.add_argument("--log-level", help="one of %s (LOG_LEVEL, default info)"
                        % ", ".join(LOG_LEVELS))
    return parser


def _pick(flags, environ, flag_name, env_name, default):
    """Return (value, source name) with the flag first, then the environment, then the default."""
    value = getattr(flags, flag_name)
    if value is not None:
        return value, "--" + flag_name.replace("_", "-")
    value = environ.get(env_name)
    if value not in (None, ""):
        return value, env_name
    return default, env_name


def parse_settings(argv, environ):
    """Build Settings from command-line arguments and an environment mapping."""
    flags = build_argument_parser().parse_args(argv)

    url, source = _pick(flags, environ, "mqtt_broker_url", "MQTT_BROKER_URL",
                        DEFAULT_MQTT_BROKER_URL)
    broker = parse_broker_url(url, source)
    url, source = _pick(flags, environ, "redis_url", "REDIS_URL", DEFAULT_REDIS_URL)
    redis_url = parse_redis_url(url, source)
    url, source = _pick(flags, environ, "database_url", "DATABASE_URL", DEFAULT_DATABASE_URL)
    database = parse_database_url(url, source)

    host, _ = _pick(flags, environ, "host", "HOST", DEFAULT_HOST)
    value, source = _pick(flags, environ, "port", "PORT", DEFAULT_PORT)
    port = _parse_int(value, source, 1, 65535)

    instance_id, source = _pick(flags, environ, "instance_id", "INSTANCE_ID", None)
    if instance_id is None:
        instance_id = secrets.token_hex(4)
    elif not INSTANCE_ID_PATTERN.match(instance_id):
        raise ConfigError("invalid %s %r: use 1 to 64 letters, digits, '-' or '_'"
                          % (source, instance_id))

    value, source = _pick(flags, environ, "metrics_interval", "METRICS_INTERVAL",
                          DEFAULT_METRICS_INTERVAL)
    metrics_interval = _parse_int(value, source, 1, 86400)
    value, source = _pick(flags, environ, "heartbeat_ttl", "HEARTBEAT_TTL", None)
    if value is None:
        heartbeat_ttl = default_heartbeat_ttl(metrics_interval)
    else:
        heartbeat_ttl = _parse_int(value, source, 1, 7 * 86400)
        if heartbeat_ttl < 2 * metrics_interval:
            raise ConfigError("invalid %s %r: must be at least %d, twice the metrics interval, "
                              "so that one lost metrics message does not mark a router offline"
                              % (source, value, 2 * metrics_interval))

    log_level, source = _pick(flags, environ, "log_level", "LOG_LEVEL", "info")
    log_level = log_level.lower()
    if log_level not in LOG_LEVELS:
        raise ConfigError("invalid %s %r: expected one of %s"
                          % (source, log_level, ", ".join(LOG_LEVELS)))

    return Settings(broker=broker, redis_url=redis_url, database=database, host=host,
                    port=port, instance_id=instance_id, metrics_interval=metrics_interval,
                    heartbeat_ttl=heartbeat_ttl, log_level=log_level)


def logging_level(name):
    """Return the logging module's level number for a LOG_LEVELS name."""
    return getattr(logging, name.upper())
