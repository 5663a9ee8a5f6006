"""The agent's settings, merged from four sources and validated once at start.

Sources, highest first:

1. the environment: SPOTFI_TOKEN, SPOTFI_MQTT_BROKER, SPOTFI_ROUTER_ID, and
   SPOTFI_<OPTION> for every other option (SPOTFI_METRICS_INTERVAL, ...);
2. UCI, section `config agent 'main'` of /etc/config/spotfi;
3. /etc/spotfi.env, the Go bridge's file, for token, broker and router id;
4. the defaults in OPTIONS.

An empty value counts as unset in every source, because the shipped UCI file
carries `option token ''` and an empty variable is the usual way to clear one.

Every system path is looked up under a root directory ("/" on a router, a
directory tree in tests), see system_path() and Paths.
"""

import os

from spotfi_agent import envfile, uci
from spotfi_agent.compat import MICROPYTHON, is_executable, is_file
from spotfi_agent.log import get_logger

log = get_logger(__name__)

UCI_CONFIG = "/etc/config/spotfi"
UCI_SECTION = "main"
UCI_SECTION_TYPE = "agent"
LEGACY_ENV_FILE = "/etc/spotfi.env"
BOARD_JSON = "/etc/board.json"
SYS_CLASS_NET = "/sys/class/net"
PROC = "/proc"

# The Go bridge used these variable names. Every other option is SPOTFI_<OPTION>.
_ENV_NAMES = {
    "token": "SPOTFI_TOKEN",
    "broker": "SPOTFI_MQTT_BROKER",
    "router_id": "SPOTFI_ROUTER_ID",
}
_LEGACY_OPTIONS = ("token", "broker", "router_id")

_BOOLEANS = {
    "1": True, "true": True, "yes": True, "on": True,
    "0": False, "false": False, "no": False, "off": False,
}
_TOKEN_SHOWN_CHARS = 2
_TOKEN_MASK_MIN_LENGTH = 12
_VALUE_SHOWN_CHARS = 80


class ConfigError(Exception):
    """Raised when a setting is missing or invalid.

    `setting` is the option name (e.g. "keepalive"). str() is one line that
    names the value, the reason and the fix. The token's value never appears.
    """

    def __init__(self, setting, message):
        super().__init__(message)
        self.setting = setting
        self.message = message

    def __str__(self):
        return self.message


def env_name(setting):
    """Return the environment variable that sets option `setting`."""
    return _ENV_NAMES.get(setting, "SPOTFI_" + setting.upper())


class _Option:
    """One option: its UCI name, how its text is converted, and its default."""

    def __init__(self, name, kind, default=None, minimum=None, maximum=None,
                 choices=None, placeholder="<value>", required=False):
        self.name = name
        self.kind = kind
        self.default = default
        self.minimum = minimum
        self.maximum = maximum
        self.choices = choices
        self.placeholder = placeholder
        self.required = required
        self.env = env_name(name)


# Options are validated in this order, so the first error raised belongs to the
# first invalid option listed here. The defaults of router_id and tunnel_shell
# depend on the root and are found by _default_value().
OPTIONS = (
    _Option("token", "token", placeholder="<token>", required=True),
    _Option("broker", "brokers", placeholder="<url>", required=True),
    _Option("router_id", "router_id", placeholder="<id>"),
    _Option("metrics_interval", "int", 30, 5, 3600, placeholder="<seconds>"),
    _Option("keepalive", "int", 60, 10, 1200, placeholder="<seconds>"),
    _Option("ca_file", "file", placeholder="<path>"),
    _Option("cert_file", "file", placeholder="<path>"),
    _Option("key_file", "file", placeholder="<path>"),
    _Option("tunnel", "bool", True, placeholder="<0|1>"),
    _Option("tunnel_shell", "shell", placeholder="<path>"),
    _Option("tunnel_max_sessions", "int", 4, 0, 32, placeholder="<count>"),
    _Option("tunnel_idle_timeout", "int", 1800, 0, None, placeholder="<seconds>"),
    _Option("rpc_timeout", "int", 30, 1, 600, placeholder="<seconds>"),
    _Option("rpc_max_concurrent", "int", 4, 1, 32, placeholder="<count>"),
    _Option("log_level", "choice", "info",
            choices=("debug", "info", "warning", "error"), placeholder="<level>"),
    _Option("transport", "choice", "native",
            choices=("native", "paho"), placeholder="<native|paho>"),
    _Option("mqtt_version", "choice", "5",
            choices=("5", "3.1.1"), placeholder="<5|3.1.1>"),
    _Option("handlers_dir", "directory", "/etc/spotfi/handlers.d", placeholder="<path>"),
    _Option("ubus", "command", "ubus", placeholder="<path>"),
    _Option("enabled", "bool", True, placeholder="<0|1>"),
)

_OPTIONS_BY_NAME = {}
for _option in OPTIONS:
    _OPTIONS_BY_NAME[_option.name] = _option


def _fix_hint(setting):
    option = _OPTIONS_BY_NAME.get(setting)
    placeholder = option.placeholder if option is not None else "<value>"
    return "set it with `uci set spotfi.%s.%s=%s` and `uci commit spotfi`, or %s" % (
        UCI_SECTION, setting, placeholder, env_name(setting))


def _show_value(value):
    """Quote a value for a message, with control characters escaped and long text cut."""
    if isinstance(value, list):
        value = " ".join(value)
    shown = []
    for char in value:
        code = ord(char)
        if code < 32 or code == 127:
            shown.append("\\x%02x" % code)
        else:
            shown.append(char)
    text = "".join(shown)
    if len(text) > _VALUE_SHOWN_CHARS:
        text = text[:_VALUE_SHOWN_CHARS] + "…"
    return "'%s'" % text


def invalid_setting(setting, value, reason, source=None):
    """Build the ConfigError for an invalid value. The token's value is never shown."""
    if setting == "token":
        shown = "(value hidden)"
    else:
        shown = _show_value(value)
    if source:
        shown = "%s from %s" % (shown, source)
    message = "invalid %s %s: %s; %s" % (setting, shown, reason, _fix_hint(setting))
    return ConfigError(setting, message)


def missing_setting(setting, reason=None):
    """Build the ConfigError for a required setting that no source sets."""
    if reason:
        message = "missing %s: %s; %s" % (setting, reason, _fix_hint(setting))
    else:
        message = "missing %s: %s" % (setting, _fix_hint(setting))
    return ConfigError(setting, message)


def system_path(root, absolute_path):
    """Return `absolute_path` as seen under `root`; root "/" returns it unchanged."""
    base = root.rstrip("/") if root else ""
    if not base:
        return absolute_path
    return base + "/" + absolute_path.lstrip("/")


class Paths:
    """System files and directories of the agent, under `root`.

    Code that reads system state (metrics from /proc, MACs from /sys) takes
    its paths from here, so that `--root` points all of it at a test tree.
    """

    def __init__(self, root="/"):
        self.root = root
        self.uci_config = system_path(root, UCI_CONFIG)
        self.env_file = system_path(root, LEGACY_ENV_FILE)
        self.board_json = system_path(root, BOARD_JSON)
        self.sys_class_net = system_path(root, SYS_CLASS_NET)
        self.proc = system_path(root, PROC)

    def system(self, absolute_path):
        """Return `absolute_path` under this root."""
        return system_path(self.root, absolute_path)

    def is_real_root(self):
        return not self.root or not self.root.rstrip("/")


class Settings:
    """The validated settings.

    Attributes: one per option in OPTIONS, except that `broker` becomes
    `brokers`, a list of brokerurl.BrokerURL in failover order. Paths
    (ca_file, cert_file, key_file, handlers_dir, tunnel_shell) hold the
    absolute path as configured, or None when an optional file is unset.
    Open them through `paths.system(path)`, which adds the root, so that
    `--root` works. ca_file, cert_file and key_file were checked to exist
    under the root.
    Also: `root`, `paths` (Paths) and `sources`, a dict from option name to
    where its value came from.
    """

    def __init__(self, paths):
        self.root = paths.root
        self.paths = paths
        self.sources = {}


class _ProcessEnvironment:
    """Read-only view of the process environment (MicroPython has no os.environ)."""

    def get(self, name, default=None):
        value = os.getenv(name)
        if value is None:
            return default
        return value


def _process_environment():
    environ = getattr(os, "environ", None)
    if environ is not None:
        return environ
    return _ProcessEnvironment()


def _is_empty(value):
    if isinstance(value, list):
        for item in value:
            if item.strip():
                return False
        return True
    return not value.strip()


def _uci_runner(paths, environ, run_command):
    """Return the callable that runs `uci`, or None to parse the file directly.

    On a router `uci` is preferred because it parses the file exactly as
    every other OpenWrt tool does. Under another root the file is parsed,
    because `uci` would read the machine's own /etc/config.

    NOTE: `uci show` also applies changes staged by `uci set` but not yet
    committed, while the file parser reads only committed ones.
    """
    if not paths.is_real_root():
        return None
    if run_command is not None:
        return run_command
    if MICROPYTHON:
        return None
    if uci.find_command("uci", environ.get("PATH")) is None:
        return None
    return uci.run_subprocess


_warned_unknown = set()


def _read_uci_options(paths, environ, run_command):
    runner = _uci_runner(paths, environ, run_command)
    section = uci.read_section(paths.uci_config, UCI_SECTION, UCI_SECTION_TYPE, runner)
    if section is None:
        return {}
    options = {}
    for name in section.options:
        if name in _OPTIONS_BY_NAME:
            options[name] = section.options[name]
            continue
        key = (paths.uci_config, name)
        if key not in _warned_unknown:
            _warned_unknown.add(key)
            log.warning("unknown option '%s' in section '%s' of %s, ignored",
                        name, UCI_SECTION, paths.uci_config)
    return options


def _collect_values(paths, environ, run_command):
    """Return {option: (raw value, source description)} from the highest source that sets it."""
    values = {}

    legacy = envfile.read_env_file(paths.env_file)
    if legacy:
        for name in _LEGACY_OPTIONS:
            value = legacy.get(env_name(name))
            if value is not None and not _is_empty(value):
                values[name] = (value, "legacy " + LEGACY_ENV_FILE)

    uci_options = _read_uci_options(paths, environ, run_command)
    for name in uci_options:
        value = uci_options[name]
        if not _is_empty(value):
            values[name] = (value, "UCI " + UCI_CONFIG)

    for option in OPTIONS:
        value = environ.get(option.env)
        if value is not None and not _is_empty(value):
            values[option.name] = (value, "environment " + option.env)
    return values


def _single(option, value, source):
    if isinstance(value, list):
        if option.kind == "brokers":
            return value
        raise invalid_setting(option.name, value,
                              "given as a UCI list, but takes one value "
                              "(write `option %s`, not `list %s`)" % (option.name, option.name),
                              source)
    return value.strip()


def _parse_int(text):
    digits = text
    if text.startswith("-") or text.startswith("+"):
        digits = text[1:]
    if not digits:
        return None
    for char in digits:
        if char not in "0123456789":
            return None
    return int(text)


def _convert_int(option, text, source):
    number = _parse_int(text)
    if number is None:
        raise invalid_setting(option.name, text, "not a whole number", source)
    if option.maximum is None and number < option.minimum:
        raise invalid_setting(option.name, text, "must be %d or more" % option.minimum, source)
    if option.maximum is not None and not option.minimum <= number <= option.maximum:
        raise invalid_setting(option.name, text, "must be between %d and %d" % (
            option.minimum, option.maximum), source)
    return number


def _convert_bool(option, text, source):
    value = _BOOLEANS.get(text.lower())
    if value is None:
        raise invalid_setting(option.name, text,
                              "not a boolean (use 1/0, true/false, yes/no or on/off)", source)
    return value


def _convert_choice(option, text, source):
    value = text.lower()
    if value not in option.choices:
        raise invalid_setting(option.name, text, "must be one of %s" % ", ".join(option.choices),
                              source)
    return value


def _require_absolute(option, text, source):
    if not text.startswith("/"):
        raise invalid_setting(option.name, text, "not an absolute path", source)


def _convert_file(option, text, source, paths):
    _require_absolute(option, text, source)
    path = paths.system(text)
    if not is_file(path):
        raise invalid_setting(option.name, text, "file %s not found" % path, source)
    return text


def _convert_token(option, text, source):
    for char in text:
        code = ord(char)
        if code < 32 or code == 127:
            raise invalid_setting(option.name, text, "contains a control character", source)
    return text


def _convert_command(option, text, source):
    for char in text:
        if char.isspace() or ord(char) < 32:
            raise invalid_setting(option.name, text,
                                  "contains whitespace; give the path of the binary only", source)
    return text


def _default_shell(paths):
    if is_file(paths.system("/bin/ash")):
        return "/bin/ash"
    return "/bin/sh"


def _convert(option, value, source, paths):
    """Convert one raw value to its typed setting; raise ConfigError when invalid."""
    # brokerurl and routerid import ConfigError from this module, so they are
    # imported at call time to keep the import graph free of cycles.
    from spotfi_agent import brokerurl, routerid

    value = _single(option, value, source)
    kind = option.kind
    if kind == "token":
        return _convert_token(option, value, source)
    if kind == "brokers":
        return brokerurl.parse_broker_list(value, source)
    if kind == "router_id":
        return routerid.validate_router_id(value, source)
    if kind == "int":
        return _convert_int(option, value, source)
    if kind == "bool":
        return _convert_bool(option, value, source)
    if kind == "choice":
        return _convert_choice(option, value, source)
    if kind == "file":
        return _convert_file(option, value, source, paths)
    if kind == "directory" or kind == "shell":
        _require_absolute(option, value, source)
        return value
    if kind == "command":
        return _convert_command(option, value, source)
    return value


def _default_value(option, paths):
    """Return (value, source) for an option that no source sets."""
    from spotfi_agent import routerid

    if option.required:
        raise missing_setting(option.name)
    if option.kind == "router_id":
        router_id, description = routerid.derive_router_id(paths.root)
        return router_id, "MAC: " + description
    if option.kind == "shell":
        return _default_shell(paths), "default"
    return option.default, "default"


def _is_directory(path):
    try:
        return os.stat(path)[0] & 0o170000 == 0o040000
    except OSError:
        return False


def _check_shell(settings):
    """Warn when the configured shell cannot run.

    Only terminal sessions need the shell, so a wrong path does not stop the
    agent: metrics and RPC keep working, and each x-start gets an error.
    """
    if not settings.tunnel or settings.sources["tunnel_shell"] == "default":
        return
    # The shell runs on this machine whatever the --root option is, so the real path is checked.
    path = settings.tunnel_shell
    if not is_executable(path):
        log.warning("tunnel_shell '%s' from %s: %s is not an executable file, so terminal "
                    "sessions will fail to start; set tunnel_shell to an installed shell",
                    settings.tunnel_shell, settings.sources["tunnel_shell"], path)


def _check_tls(settings):
    if (settings.cert_file is None) != (settings.key_file is None):
        given = "cert_file" if settings.cert_file is not None else "key_file"
        other = "key_file" if given == "cert_file" else "cert_file"
        raise missing_setting(other, "%s is set, and a client certificate needs both "
                                     "cert_file and key_file" % given)
    uses_tls = False
    for broker in settings.brokers:
        if broker.tls:
            uses_tls = True
    if uses_tls:
        return
    for name in ("ca_file", "cert_file", "key_file"):
        if getattr(settings, name) is not None:
            log.warning("%s is set but no broker uses TLS (mqtts:// or ssl://), so it is unused",
                        name)


def load_settings(root="/", environ=None, run_command=None, overrides=None):
    """Read, merge and validate the settings; return a Settings or raise ConfigError.

    `environ` maps variable names to values (the process environment by
    default). `run_command(argv)` runs `uci` and returns (exit status, output
    text), or raises OSError when the command cannot run. It is used only when
    `root` is "/". Without it, a subprocess runs `uci` on CPython when `uci`
    is on PATH, and the file is parsed otherwise. `overrides` maps option
    names to (value, source) pairs that win over every source, such as
    command-line flags.
    """
    paths = Paths(root)
    if not paths.is_real_root() and not _is_directory(paths.root):
        raise ConfigError("root", "root directory '%s' not found: pass an existing directory "
                                  "with --root or SPOTFI_ROOT" % paths.root)
    if environ is None:
        environ = _process_environment()
    values = _collect_values(paths, environ, run_command)
    for name in overrides or {}:
        value, source = overrides[name]
        if value is not None and not _is_empty(value):
            values[name] = (value, source)
    settings = Settings(paths)

    for option in OPTIONS:
        entry = values.get(option.name)
        if entry is None:
            value, source = _default_value(option, paths)
        else:
            value = _convert(option, entry[0], entry[1], paths)
            source = entry[1]
        attribute = "brokers" if option.kind == "brokers" else option.name
        setattr(settings, attribute, value)
        settings.sources[option.name] = source

    _check_shell(settings)
    _check_tls(settings)
    return settings


def mask_token(token):
    """Return a form of `token` that identifies it without revealing it."""
    if len(token) < _TOKEN_MASK_MIN_LENGTH:
        return "****"
    return "%s… (%d characters)" % (token[:_TOKEN_SHOWN_CHARS], len(token))


def _describe_value(settings, option):
    if option.kind == "token":
        return mask_token(settings.token)
    if option.kind == "brokers":
        return ", ".join([broker.display for broker in settings.brokers])
    value = getattr(settings, option.name)
    if option.kind == "bool":
        return "1" if value else "0"
    if value is None:
        if option.name == "ca_file":
            return "(system CA store)"
        return "(unset)"
    return str(value)


def describe(settings):
    """Return lines "name = value  (source)" for `spotfi-agent info`, with the token masked."""
    lines = []
    for option in OPTIONS:
        lines.append("%s = %s  (%s)" % (option.name, _describe_value(settings, option),
                                        settings.sources.get(option.name, "default")))
    return lines
