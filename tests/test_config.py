"""Settings: source precedence, validation, defaults, paths and the legacy env file."""

import logging
import os
import subprocess
import sys

import pytest

from spotfi_agent import config
from spotfi_agent.brokerurl import BrokerURL
from spotfi_agent.config import ConfigError, describe, load_settings, mask_token, system_path
from spotfi_agent.envfile import parse_env_file

TOKEN = "tok-5ecret-value-0123456789"
ETH0_MAC = "00:11:22:33:44:77"


def config_error_of(function, *args, **kwargs):
    try:
        function(*args, **kwargs)
    except ConfigError as error:
        return error
    raise AssertionError("no ConfigError raised")


def write(root, relative, text, mode=None):
    path = str(root) + "/" + relative
    os.makedirs(path[:path.rfind("/")], exist_ok=True)
    with open(path, "w") as handle:
        handle.write(text)
    if mode is not None:
        os.chmod(path, mode)
    return path


def write_uci(root, *lines):
    return write(root, "etc/config/spotfi", "config agent 'main'\n" + "".join(
        "\t" + line + "\n" for line in lines))


def make_root(tmp_path, token=TOKEN, broker="mqtt://uci.example.com", *extra):
    """A fake root with a valid UCI file and an eth0 MAC to derive the router id from."""
    lines = []
    if token is not None:
        lines.append("option token '%s'" % token)
    if broker is not None:
        lines.append("option broker '%s'" % broker)
    write_uci(tmp_path, *(lines + list(extra)))
    write(tmp_path, "sys/class/net/eth0/address", ETH0_MAC + "\n")
    return str(tmp_path)


def load(root, **environ):
    return load_settings(root, environ=environ)


# Precedence: environment > UCI > legacy env file > default.

def test_token_precedence(tmp_path):
    write(tmp_path, "etc/spotfi.env", 'SPOTFI_TOKEN="legacy-token-value"\n')
    root = make_root(tmp_path, token="uci-token-value-123")

    settings = load(root, SPOTFI_TOKEN="env-token-value-1234")
    assert settings.token == "env-token-value-1234"
    assert settings.sources["token"] == "environment SPOTFI_TOKEN"

    settings = load(root)
    assert settings.token == "uci-token-value-123"
    assert settings.sources["token"] == "UCI /etc/config/spotfi"

    make_root(tmp_path, token=None)
    settings = load(root)
    assert settings.token == "legacy-token-value"
    assert settings.sources["token"] == "legacy /etc/spotfi.env"

    os.remove(root + "/etc/spotfi.env")
    error = config_error_of(load, root)
    assert error.setting == "token"
    assert str(error) == ("missing token: set it with `uci set spotfi.main.token=<token>` "
                          "and `uci commit spotfi`, or SPOTFI_TOKEN")


def test_broker_precedence(tmp_path):
    write(tmp_path, "etc/spotfi.env", "SPOTFI_MQTT_BROKER=tcp://legacy.example.com:1883\n")
    root = make_root(tmp_path, broker="mqtts://uci.example.com")

    settings = load(root, SPOTFI_MQTT_BROKER="ssl://env.example.com")
    assert settings.brokers == [BrokerURL("env.example.com", 8883, True)]
    assert settings.sources["broker"] == "environment SPOTFI_MQTT_BROKER"

    settings = load(root)
    assert settings.brokers == [BrokerURL("uci.example.com", 8883, True)]
    assert settings.sources["broker"] == "UCI /etc/config/spotfi"

    make_root(tmp_path, broker=None)
    settings = load(root)
    assert settings.brokers == [BrokerURL("legacy.example.com", 1883, False)]
    assert settings.sources["broker"] == "legacy /etc/spotfi.env"

    os.remove(root + "/etc/spotfi.env")
    error = config_error_of(load, root)
    assert error.setting == "broker"
    assert str(error).startswith("missing broker: ")
    assert "SPOTFI_MQTT_BROKER" in str(error)


def test_router_id_precedence(tmp_path):
    write(tmp_path, "etc/spotfi.env", "export SPOTFI_ROUTER_ID='legacy-id'\n")
    root = make_root(tmp_path, TOKEN, "mqtt://b", "option router_id 'uci-id'")

    settings = load(root, SPOTFI_ROUTER_ID="env-id")
    assert settings.router_id == "env-id"
    assert settings.sources["router_id"] == "environment SPOTFI_ROUTER_ID"

    settings = load(root)
    assert settings.router_id == "uci-id"
    assert settings.sources["router_id"] == "UCI /etc/config/spotfi"

    make_root(tmp_path)
    settings = load(root)
    assert settings.router_id == "legacy-id"
    assert settings.sources["router_id"] == "legacy /etc/spotfi.env"

    os.remove(root + "/etc/spotfi.env")
    settings = load(root)
    assert settings.router_id == "001122334477"
    assert settings.sources["router_id"] == "MAC: eth0 MAC in /sys/class/net"


def test_router_id_from_board_label(tmp_path):
    root = make_root(tmp_path)
    write(tmp_path, "etc/board.json", '{"system": {"label_macaddr": "A0:B1:C2:D3:E4:F5"}}')
    settings = load(root)
    assert settings.router_id == "a0b1c2d3e4f5"
    assert settings.sources["router_id"] == "MAC: label MAC in /etc/board.json"


def test_empty_values_count_as_unset(tmp_path):
    write(tmp_path, "etc/spotfi.env", "SPOTFI_TOKEN=legacy-token-value\n")
    root = make_root(tmp_path, "", "mqtt://b", "option keepalive ''")
    settings = load(root, SPOTFI_TOKEN="", SPOTFI_KEEPALIVE="")
    assert settings.token == "legacy-token-value"
    assert settings.keepalive == 60
    assert settings.sources["keepalive"] == "default"


def test_surrounding_whitespace_stripped(tmp_path):
    root = make_root(tmp_path)
    settings = load(root, SPOTFI_TOKEN="  %s\n" % TOKEN, SPOTFI_KEEPALIVE=" 90 ")
    assert settings.token == TOKEN
    assert settings.keepalive == 90


def test_other_options_from_environment(tmp_path):
    root = make_root(tmp_path, TOKEN, "mqtt://b", "option metrics_interval '60'")
    settings = load(root, SPOTFI_METRICS_INTERVAL="45", SPOTFI_TUNNEL="off",
                    SPOTFI_LOG_LEVEL="DEBUG", SPOTFI_RPC_MAX_CONCURRENT="8")
    assert settings.metrics_interval == 45
    assert settings.sources["metrics_interval"] == "environment SPOTFI_METRICS_INTERVAL"
    assert settings.tunnel is False
    assert settings.log_level == "debug"
    assert settings.rpc_max_concurrent == 8


def test_legacy_file_sets_only_its_three_keys(tmp_path):
    write(tmp_path, "etc/spotfi.env", "SPOTFI_KEEPALIVE=99\nSPOTFI_TOKEN=legacy-token-value\n")
    root = make_root(tmp_path, token=None)
    settings = load(root)
    assert settings.token == "legacy-token-value"
    assert settings.keepalive == 60


def test_defaults(tmp_path):
    root = make_root(tmp_path)
    settings = load(root)
    assert settings.metrics_interval == 30
    assert settings.keepalive == 60
    assert settings.ca_file is None
    assert settings.cert_file is None
    assert settings.key_file is None
    assert settings.tunnel is True
    assert settings.tunnel_shell == "/bin/sh"
    assert settings.tunnel_max_sessions == 4
    assert settings.tunnel_idle_timeout == 1800
    assert settings.rpc_timeout == 30
    assert settings.rpc_max_concurrent == 4
    assert settings.log_level == "info"
    assert settings.transport == "native"
    assert settings.mqtt_version == "5"
    assert settings.handlers_dir == "/etc/spotfi/handlers.d"
    assert settings.ubus == "ubus"
    assert settings.enabled is True
    assert settings.root == root
    for name in ("metrics_interval", "tunnel", "ubus", "enabled"):
        assert settings.sources[name] == "default"


def test_every_option_has_attribute_and_source(tmp_path):
    settings = load(make_root(tmp_path))
    for option in config.OPTIONS:
        attribute = "brokers" if option.name == "broker" else option.name
        assert hasattr(settings, attribute), attribute
        assert option.name in settings.sources, option.name


def test_tunnel_shell_default_prefers_ash(tmp_path):
    root = make_root(tmp_path)
    write(tmp_path, "bin/ash", "#!/bin/sh\n", 0o755)
    assert load(root).tunnel_shell == "/bin/ash"


def test_tunnel_shell_missing_warns(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="spotfi_agent.config")
    missing = str(tmp_path / "no-such-shell")
    root = make_root(tmp_path, TOKEN, "mqtt://b", "option tunnel_shell '%s'" % missing)
    assert load(root).tunnel_shell == missing
    assert "tunnel_shell '%s'" % missing in caplog.text
    assert "not an executable file" in caplog.text

    caplog.clear()
    write(tmp_path, "no-such-shell", "#!/bin/sh\n", 0o644)
    load(root)
    assert "not an executable file" in caplog.text

    caplog.clear()
    os.chmod(missing, 0o755)
    assert load(root).tunnel_shell == missing
    assert caplog.text == ""


def test_tunnel_shell_checked_outside_root(tmp_path, caplog):
    """The shell runs on this machine, so a fake root without bin/sh gives no warning."""
    caplog.set_level(logging.WARNING, logger="spotfi_agent.config")
    root = make_root(tmp_path, TOKEN, "mqtt://b", "option tunnel_shell '/bin/sh'")

    assert load(root).tunnel_shell == "/bin/sh"
    assert caplog.text == ""


def test_missing_root_directory_is_error(tmp_path):
    try:
        config.load_settings(root=str(tmp_path / "absent"), environ={})
    except config.ConfigError as error:
        assert error.setting == "root"
        assert "not found" in str(error)
    else:
        raise AssertionError("a missing root directory was accepted")


def test_override_wins_and_names_source(tmp_path):
    root = make_root(tmp_path, TOKEN, "mqtt://b", "option log_level 'info'")
    settings = config.load_settings(root=root, environ={},
                                    overrides={"log_level": ("debug", "command line --log-level")})

    assert settings.log_level == "debug"
    assert settings.sources["log_level"] == "command line --log-level"


def test_tunnel_shell_unchecked_when_tunnel_off(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="spotfi_agent.config")
    root = make_root(tmp_path, TOKEN, "mqtt://b", "option tunnel_shell '/bin/bash'",
                     "option tunnel '0'")
    settings = load(root)
    assert settings.tunnel is False
    assert settings.tunnel_shell == "/bin/bash"
    assert caplog.text == ""


def test_booleans_accepted_forms(tmp_path):
    root = make_root(tmp_path)
    for text, expected in (("1", True), ("0", False), ("true", True), ("False", False),
                           ("yes", True), ("no", False), ("ON", True), ("off", False)):
        assert load(root, SPOTFI_ENABLED=text).enabled is expected, text


INVALID = [
    ("metrics_interval", "4", "between 5 and 3600"),
    ("metrics_interval", "3601", "between 5 and 3600"),
    ("metrics_interval", "30s", "not a whole number"),
    ("metrics_interval", "1.5", "not a whole number"),
    ("keepalive", "9", "between 10 and 1200"),
    ("keepalive", "1201", "between 10 and 1200"),
    ("tunnel_max_sessions", "33", "between 0 and 32"),
    ("tunnel_max_sessions", "-1", "between 0 and 32"),
    ("tunnel_idle_timeout", "-5", "0 or more"),
    ("rpc_timeout", "0", "between 1 and 600"),
    ("rpc_timeout", "601", "between 1 and 600"),
    ("rpc_max_concurrent", "0", "between 1 and 32"),
    ("rpc_max_concurrent", "33", "between 1 and 32"),
    ("tunnel", "maybe", "not a boolean"),
    ("enabled", "2", "not a boolean"),
    ("log_level", "verbose", "debug, info, warning, error"),
    ("transport", "mosquitto", "native, paho"),
    ("mqtt_version", "4", "must be one of 5, 3.1.1"),
    ("mqtt_version", "3.1", "must be one of 5, 3.1.1"),
    ("mqtt_version", "v5", "must be one of 5, 3.1.1"),
    ("ca_file", "/etc/ssl/missing.pem", "not found"),
    ("ca_file", "relative.pem", "not an absolute path"),
    ("handlers_dir", "handlers.d", "not an absolute path"),
    ("tunnel_shell", "ash", "not an absolute path"),
    ("ubus", "ubus -t 5", "whitespace"),
    ("router_id", "a/b", "not allowed"),
    ("broker", "ws://broker.example.com", "unsupported scheme"),
]


def test_invalid_values_name_the_setting(tmp_path):
    root = make_root(tmp_path)
    for name, value, reason in INVALID:
        variable = config.env_name(name)
        error = config_error_of(load, root, **{variable: value})
        message = str(error)
        assert error.setting == name, (name, value)
        assert message.startswith("invalid %s '%s' from environment %s: " % (
            name, value, variable)), message
        assert reason in message, message
        assert "uci set spotfi.main.%s=" % name in message, message
        assert message.endswith("or %s" % variable), message
        assert "\n" not in message


def test_invalid_uci_value_names_uci_source(tmp_path):
    root = make_root(tmp_path, TOKEN, "mqtt://b", "option keepalive 'soon'")
    error = config_error_of(load, root)
    assert str(error).startswith("invalid keepalive 'soon' from UCI /etc/config/spotfi: ")


def test_uci_list_for_single_option_is_error(tmp_path):
    root = make_root(tmp_path, TOKEN, "mqtt://b", "list keepalive '30'", "list keepalive '40'")
    error = config_error_of(load, root)
    assert error.setting == "keepalive"
    assert "`option keepalive`" in str(error)


def test_mqtt_version_from_uci_and_environment(tmp_path):
    root = make_root(tmp_path, TOKEN, "mqtt://b", "option mqtt_version '3.1.1'")
    settings = load(root)
    assert settings.mqtt_version == "3.1.1"
    assert settings.sources["mqtt_version"] == "UCI /etc/config/spotfi"

    settings = load(root, SPOTFI_MQTT_VERSION="5")
    assert settings.mqtt_version == "5"
    assert settings.sources["mqtt_version"] == "environment SPOTFI_MQTT_VERSION"


def test_invalid_mqtt_version_exits_2(tmp_path):
    root = make_root(tmp_path, TOKEN, "mqtt://127.0.0.1:9", "option mqtt_version '5.0'")
    environment = {key: value for key, value in os.environ.items()
                   if not key.startswith("SPOTFI_")}
    environment["PYTHONPATH"] = os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), "agent")
    result = subprocess.run([sys.executable, "-m", "spotfi_agent", "--root", root, "run"],
                            env=environment, capture_output=True, text=True, timeout=20)

    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "invalid mqtt_version '5.0' from UCI /etc/config/spotfi: must be one of 5, 3.1.1" \
        in lines[0]
    assert "uci set spotfi.main.mqtt_version=<5|3.1.1>" in lines[0]


def test_first_error_in_option_order(tmp_path):
    root = make_root(tmp_path, TOKEN, "mqtt://b", "option keepalive '1'",
                     "option metrics_interval '1'")
    assert config_error_of(load, root).setting == "metrics_interval"


def test_brokers_uci_list_in_order(tmp_path):
    root = make_root(tmp_path, TOKEN, None, "list broker 'mqtts://a.example.com'",
                     "list broker 'b.example.com:1884'")
    settings = load(root)
    assert [broker.display for broker in settings.brokers] == [
        "mqtts://a.example.com:8883", "mqtt://b.example.com:1884"]


def test_brokers_comma_separated_environment(tmp_path):
    settings = load(make_root(tmp_path),
                    SPOTFI_MQTT_BROKER="mqtts://a.example.com,ssl://b.example.com:8884")
    assert settings.brokers == [BrokerURL("a.example.com", 8883, True),
                                BrokerURL("b.example.com", 8884, True)]


def test_brokers_comma_separated_legacy_file(tmp_path):
    write(tmp_path, "etc/spotfi.env", 'SPOTFI_MQTT_BROKER="tcp://a:1883, tcp://b:1883"\n')
    settings = load(make_root(tmp_path, broker=None))
    assert [broker.host for broker in settings.brokers] == ["a", "b"]


def test_tls_files_checked_under_root(tmp_path):
    write(tmp_path, "etc/ssl/ca.pem", "ca")
    write(tmp_path, "etc/ssl/client.pem", "cert")
    write(tmp_path, "etc/ssl/client.key", "key")
    root = make_root(tmp_path, TOKEN, "mqtts://b", "option ca_file '/etc/ssl/ca.pem'",
                     "option cert_file '/etc/ssl/client.pem'",
                     "option key_file '/etc/ssl/client.key'")
    settings = load(root)
    assert settings.ca_file == "/etc/ssl/ca.pem"
    assert settings.cert_file == "/etc/ssl/client.pem"
    assert settings.key_file == "/etc/ssl/client.key"
    assert settings.paths.system(settings.ca_file) == root + "/etc/ssl/ca.pem"
    assert settings.sources["ca_file"] == "UCI /etc/config/spotfi"


def test_tls_file_missing_names_real_path(tmp_path):
    root = make_root(tmp_path, TOKEN, "mqtts://b", "option ca_file '/etc/ssl/ca.pem'")
    error = config_error_of(load, root)
    assert error.setting == "ca_file"
    assert "file %s/etc/ssl/ca.pem not found" % root in str(error)


def test_handlers_dir_configured_value(tmp_path):
    root = make_root(tmp_path, TOKEN, "mqtt://b", "option handlers_dir '/srv/handlers'")
    settings = load(root)
    assert settings.handlers_dir == "/srv/handlers"
    assert settings.paths.system(settings.handlers_dir) == root + "/srv/handlers"


def test_cert_file_without_key_file_is_error(tmp_path):
    write(tmp_path, "etc/ssl/client.pem", "cert")
    root = make_root(tmp_path, TOKEN, "mqtts://b", "option cert_file '/etc/ssl/client.pem'")
    error = config_error_of(load, root)
    assert error.setting == "key_file"
    assert str(error).startswith("missing key_file: cert_file is set")


def test_key_file_without_cert_file_is_error(tmp_path):
    write(tmp_path, "etc/ssl/client.key", "key")
    root = make_root(tmp_path, TOKEN, "mqtts://b", "option key_file '/etc/ssl/client.key'")
    assert config_error_of(load, root).setting == "cert_file"


def test_tls_files_without_tls_broker_warn(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="spotfi_agent.config")
    write(tmp_path, "etc/ssl/ca.pem", "ca")
    root = make_root(tmp_path, TOKEN, "mqtt://b", "option ca_file '/etc/ssl/ca.pem'")
    load(root)
    assert "ca_file is set but no broker uses TLS" in caplog.text


def test_unknown_uci_option_warned_once(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="spotfi_agent.config")
    root = make_root(tmp_path, TOKEN, "mqtt://b", "option tls_insecure '1'")
    load(root)
    load(root)
    assert caplog.text.count("unknown option 'tls_insecure'") == 1


def test_unnamed_agent_section_used(tmp_path):
    write(tmp_path, "etc/config/spotfi", "config agent\n\toption token '%s'\n"
                                         "\toption broker 'mqtt://b'\n" % TOKEN)
    write(tmp_path, "sys/class/net/eth0/address", ETH0_MAC + "\n")
    assert load(str(tmp_path)).token == TOKEN


def test_token_never_in_errors_or_describe(tmp_path):
    bad_token = TOKEN[:6] + "\x01" + TOKEN[6:]
    root = make_root(tmp_path)
    error = config_error_of(load, root, SPOTFI_TOKEN=bad_token)
    assert error.setting == "token"
    assert TOKEN[:6] not in str(error)
    assert TOKEN[6:] not in str(error)
    assert "(value hidden)" in str(error)
    assert "control character" in str(error)

    error = config_error_of(load, root, SPOTFI_KEEPALIVE="x")
    assert TOKEN not in str(error)

    settings = load(root, SPOTFI_TOKEN=TOKEN)
    text = "\n".join(describe(settings))
    assert TOKEN not in text
    assert TOKEN[:8] not in text


def test_token_list_error_hides_token(tmp_path):
    root = make_root(tmp_path, None, "mqtt://b", "list token '%s'" % TOKEN, "list token 'x'")
    error = config_error_of(load, root)
    assert error.setting == "token"
    assert TOKEN not in str(error)


def test_mask_token():
    assert mask_token(TOKEN) == "to… (%d characters)" % len(TOKEN)
    assert mask_token("short") == "****"
    assert mask_token("elevenchars") == "****"


def test_describe_lines(tmp_path):
    root = make_root(tmp_path, TOKEN, "mqtts://a.example.com, mqtt://b.example.com")
    lines = describe(load(root))
    assert lines[0] == "token = to… (%d characters)  (UCI /etc/config/spotfi)" % len(TOKEN)
    assert lines[1] == ("broker = mqtts://a.example.com:8883, mqtt://b.example.com:1883  "
                        "(UCI /etc/config/spotfi)")
    assert lines[2] == "router_id = 001122334477  (MAC: eth0 MAC in /sys/class/net)"
    assert "metrics_interval = 30  (default)" in lines
    assert "tunnel = 1  (default)" in lines
    assert "ca_file = (system CA store)  (default)" in lines
    assert len(lines) == len(config.OPTIONS)


def test_system_path():
    assert system_path("/", "/etc/config/spotfi") == "/etc/config/spotfi"
    assert system_path("", "/proc/loadavg") == "/proc/loadavg"
    assert system_path("/tmp/root", "/proc/loadavg") == "/tmp/root/proc/loadavg"
    assert system_path("/tmp/root/", "/proc") == "/tmp/root/proc"
    assert system_path("relative", "/etc/board.json") == "relative/etc/board.json"


def test_paths_under_root(tmp_path):
    settings = load(make_root(tmp_path))
    root = str(tmp_path)
    assert settings.paths.proc == root + "/proc"
    assert settings.paths.sys_class_net == root + "/sys/class/net"
    assert settings.paths.board_json == root + "/etc/board.json"
    assert settings.paths.uci_config == root + "/etc/config/spotfi"
    assert settings.paths.env_file == root + "/etc/spotfi.env"
    assert settings.paths.system("/proc/net/dev") == root + "/proc/net/dev"
    assert config.Paths("/").proc == "/proc"


def uci_test_double(output):
    """Stand-in for the `uci` command, which OpenWrt has and this machine does not."""
    calls = []

    def run(argv):
        calls.append(list(argv))
        return 0, output

    run.calls = calls
    return run


def test_uci_command_not_used_under_fake_root(tmp_path):
    run = uci_test_double("spotfi.main=agent\nspotfi.main.token='from-command'\n")
    settings = load_settings(make_root(tmp_path), environ={}, run_command=run)
    assert settings.token == TOKEN
    assert run.calls == []


@pytest.mark.skipif(os.path.exists("/etc/config/spotfi") or os.path.exists("/etc/spotfi.env"),
                    reason="this machine has its own spotfi configuration")
def test_uci_command_used_on_real_root():
    run = uci_test_double("spotfi.main=agent\n"
                          "spotfi.main.token='%s'\n"
                          "spotfi.main.broker='mqtts://a.example.com' 'mqtt://b.example.com'\n"
                          "spotfi.main.router_id='router-1'\n" % TOKEN)
    settings = load_settings("/", environ={}, run_command=run)
    assert run.calls == [["uci", "-q", "show", "spotfi"]]
    assert settings.token == TOKEN
    assert [broker.host for broker in settings.brokers] == ["a.example.com", "b.example.com"]
    assert settings.router_id == "router-1"
    assert settings.sources["token"] == "UCI /etc/config/spotfi"


def test_env_file_forms():
    values = parse_env_file(
        "# Go bridge settings\n"
        "\n"
        'SPOTFI_TOKEN="double quoted"\n'
        "SPOTFI_MQTT_BROKER=tcp://bare:1883\n"
        "export SPOTFI_ROUTER_ID='single quoted'\n"
        "  SPOTFI_A=\"esc \\\"aped\\\" \\\\ \\n\"  # comment\n"
        "SPOTFI_B='it'\\''s'\n"
        "SPOTFI_C=\n"
        "SPOTFI_D=value\r\n"
    )
    assert values == {
        "SPOTFI_TOKEN": "double quoted",
        "SPOTFI_MQTT_BROKER": "tcp://bare:1883",
        "SPOTFI_ROUTER_ID": "single quoted",
        "SPOTFI_A": 'esc "aped" \\ \\n',
        "SPOTFI_B": "it's",
        "SPOTFI_C": "",
        "SPOTFI_D": "value",
    }


def test_env_file_bad_lines_skipped_without_values(caplog):
    caplog.set_level(logging.WARNING, logger="spotfi_agent.envfile")
    values = parse_env_file(
        "not an assignment\n"
        "1BAD=x\n"
        'SPOTFI_TOKEN="unterminated-secret\n'
        "SPOTFI_ROUTER_ID=good extra\n"
        "SPOTFI_MQTT_BROKER=mqtt://ok\n",
        "spotfi.env",
    )
    assert values == {"SPOTFI_ROUTER_ID": "good", "SPOTFI_MQTT_BROKER": "mqtt://ok"}
    assert "spotfi.env line 1" in caplog.text
    assert "spotfi.env line 2" in caplog.text
    assert "spotfi.env line 3: unterminated double quote" in caplog.text
    assert "spotfi.env line 4" in caplog.text
    assert "unterminated-secret" not in caplog.text
