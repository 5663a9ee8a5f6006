"""Settings parsers (broker URLs, UCI, env files, router id, topics), on CPython and MicroPython."""

import json

from mpytest import TempDir, make_dirs, raises, write_file

from spotfi_agent import brokerurl, envfile, routerid, uci
from spotfi_agent.config import ConfigError, load_settings
from spotfi_agent.topics import Topics


def test_broker_url_forms():
    cases = [
        ("mqtt://broker.example", "broker.example", 1883, False),
        ("mqtts://broker.example", "broker.example", 8883, True),
        ("tcp://10.0.0.1:1884", "10.0.0.1", 1884, False),
        ("ssl://broker.example:9000/", "broker.example", 9000, True),
        ("broker.example:1999", "broker.example", 1999, False),
        ("broker.example", "broker.example", 1883, False),
        ("mqtt://[2001:db8::1]:1885", "2001:db8::1", 1885, False),
        ("MQTTS://[fe80::1%eth0]", "fe80::1%eth0", 8883, True),
    ]
    for text, host, port, tls in cases:
        broker = brokerurl.parse_broker(text)
        assert broker.host == host, text
        assert broker.port == port, text
        assert broker.tls == tls, text


def test_broker_url_display():
    assert brokerurl.parse_broker("ssl://[2001:db8::1]").display == "mqtts://[2001:db8::1]:8883"


def test_broker_url_invalid():
    cases = [
        ("", "empty broker address"),
        ("http://broker.example", "unsupported scheme 'http'"),
        ("mqtt://broker.example:0", "out of range"),
        ("mqtt://broker.example:abc", "invalid port 'abc'"),
        ("mqtt://user:pw@broker.example", "user name or password"),
        ("mqtt://2001:db8::1", "IPv6 address in brackets"),
        ("mqtt://[2001:db8::1", "missing ']'"),
        ("mqtt://bad host", "whitespace"),
        ("mqtt://bad_host!", "invalid host name"),
    ]
    for text, reason in cases:
        error = raises(ConfigError, brokerurl.parse_broker, text)
        assert reason in str(error), (text, str(error))
        assert error.setting == "broker"


def test_broker_url_hides_password():
    error = raises(ConfigError, brokerurl.parse_broker, "mqtt://user:hunter2@broker.example")
    assert "hunter2" not in str(error)


def test_broker_list_order_and_duplicates():
    brokers = brokerurl.parse_broker_list(["mqtt://a, mqtts://b", "mqtt://a:1883", ""])
    assert [broker.display for broker in brokers] == ["mqtt://a:1883", "mqtts://b:8883"]
    raises(ConfigError, brokerurl.parse_broker_list, " , ")


UCI_TEXT = """
package spotfi

config agent 'main'
	option token 'it'\\''s'
	option broker "mqtt://a"  # comment after a value
	list broker 'mqtt://b'
	list broker mqtt://c
	option empty ''
	bogus line here

config other
	option x '1'
"""


def test_uci_parse_config():
    sections = uci.parse_config(UCI_TEXT, "test file")
    assert len(sections) == 2
    main = sections[0]
    assert main.type == "agent"
    assert main.name == "main"
    assert main.options["token"] == "it's"
    assert main.options["broker"] == ["mqtt://a", "mqtt://b", "mqtt://c"]
    assert main.options["empty"] == ""
    assert sections[1].name is None
    assert sections[1].options == {"x": "1"}


def test_uci_unterminated_quote():
    sections = uci.parse_config("config agent 'main'\n\toption token 'abc\n", "test file")
    assert len(sections) == 1
    assert "token" not in sections[0].options


def test_uci_parse_show():
    text = ("spotfi.main=agent\n"
            "spotfi.main.token='t'\n"
            "spotfi.main.broker='mqtt://a' 'mqtt://b'\n"
            "spotfi.@agent[1]=agent\n"
            "other.x.y='z'\n")
    sections = uci.parse_show(text, "spotfi")
    assert [section.name for section in sections] == ["main", None]
    assert sections[0].options == {"token": "t", "broker": ["mqtt://a", "mqtt://b"]}


def test_uci_read_section_unnamed_fallback():
    with TempDir() as directory:
        path = directory + "/spotfi"
        write_file(path, "config agent\n\toption token 'x'\n")
        section = uci.read_section(path, "main", "agent")
        assert section is not None
        assert section.options["token"] == "x"
        assert uci.read_section(directory + "/missing", "main", "agent") is None


def test_env_file_parse():
    text = ("# Go bridge settings\n"
            "export SPOTFI_TOKEN='a b'\n"
            "SPOTFI_MQTT_BROKER=\"mqtt://x\\\"y\"\n"
            "SPOTFI_ROUTER_ID=r1 # trailing comment\n"
            "not an assignment\n"
            "BAD='unterminated\n"
            "EMPTY=\n")
    values = envfile.parse_env_file(text, "test env")
    assert values == {"SPOTFI_TOKEN": "a b", "SPOTFI_MQTT_BROKER": 'mqtt://x"y',
                      "SPOTFI_ROUTER_ID": "r1", "EMPTY": ""}


def test_env_file_missing():
    assert envfile.read_env_file("/nonexistent/spotfi.env") is None


def test_router_id_validation():
    assert routerid.validate_router_id("Router_1.a-b") == "Router_1.a-b"
    for bad in ("", "a/b", "a+b", "x" * 65):
        raises(ConfigError, routerid.validate_router_id, bad)


def test_router_id_mac_rules():
    assert routerid.normalise_mac("A0:B1:C2:D3:E4:F5") == "a0b1c2d3e4f5"
    assert routerid.normalise_mac("a0-b1-c2-d3-e4-f5") == "a0b1c2d3e4f5"
    assert routerid.normalise_mac("a0b1c2") is None
    assert routerid.is_usable_mac("000000000000", False) is False
    assert routerid.is_usable_mac("010000000001", False) is False
    assert routerid.is_usable_mac("020000000001", True) is False
    assert routerid.is_usable_mac("020000000001", False) is True


def test_router_id_from_board_json():
    with TempDir() as root:
        write_file(root + "/etc/board.json",
                   json.dumps({"system": {"label_macaddr": "00:00:00:00:00:00"},
                               "network": {"lan": {"macaddr": "06:11:22:33:44:55"}}}))
        write_file(root + "/sys/class/net/eth0/address", "a0:b1:c2:d3:e4:f5\n")
        router_id, source = routerid.derive_router_id(root)
        assert router_id == "061122334455"
        assert "LAN MAC" in source


def test_router_id_from_interfaces():
    with TempDir() as root:
        write_file(root + "/sys/class/net/lo/address", "00:00:00:00:00:00\n")
        write_file(root + "/sys/class/net/wlan0/address", "02:aa:bb:cc:dd:ee\n")
        write_file(root + "/sys/class/net/wan/address", "a0:b1:c2:d3:e4:f5\n")
        router_id, source = routerid.derive_router_id(root)
        assert router_id == "a0b1c2d3e4f5"
        assert "wan" in source


def test_router_id_without_mac():
    with TempDir() as root:
        make_dirs(root + "/sys/class/net")
        error = raises(ConfigError, routerid.derive_router_id, root)
        assert error.setting == "router_id"


def test_topics():
    topics = Topics("r1")
    assert topics.status == "spotfi/router/r1/status"
    assert topics.rpc_request == "spotfi/router/r1/rpc/request"
    assert topics.x_out == "spotfi/router/r1/x/out"
    assert topics.is_own("spotfi/router/r1/rpc/custom")
    assert not topics.is_own("spotfi/router/r1/")
    assert not topics.is_own("spotfi/router/r1/#")
    assert not topics.is_own("spotfi/router/r2/rpc/response")
    assert topics.is_go_era_reply("spotfi/api/instance-1/x/out")
    assert not topics.is_go_era_reply("spotfi/api//x/out")


def test_load_settings_from_uci_and_environment():
    with TempDir() as root:
        write_file(root + "/etc/config/spotfi",
                   "config agent 'main'\n"
                   "\toption token 'uci-token'\n"
                   "\tlist broker 'mqtt://a:1884'\n"
                   "\tlist broker 'mqtts://b'\n"
                   "\toption router_id 'r9'\n"
                   "\toption keepalive '30'\n")
        write_file(root + "/bin/ash", "")
        settings = load_settings(root=root, environ={"SPOTFI_METRICS_INTERVAL": "15"})
        assert settings.token == "uci-token"
        assert [broker.display for broker in settings.brokers] == ["mqtt://a:1884",
                                                                   "mqtts://b:8883"]
        assert settings.router_id == "r9"
        assert settings.keepalive == 30
        assert settings.metrics_interval == 15
        assert settings.sources["metrics_interval"] == "environment SPOTFI_METRICS_INTERVAL"
        assert settings.tunnel_shell == "/bin/ash"


def test_load_settings_invalid_value():
    with TempDir() as root:
        write_file(root + "/etc/config/spotfi",
                   "config agent 'main'\n\toption token 't'\n\toption broker 'mqtt://a'\n"
                   "\toption router_id 'r1'\n\toption keepalive '5'\n")
        error = raises(ConfigError, load_settings, root, {})
        assert error.setting == "keepalive"
        assert "between 10 and 1200" in str(error)
        assert "uci set spotfi.main.keepalive" in str(error)
