"""Broker address parsing: every accepted form, and the errors for the rest."""

import logging

from spotfi_agent.brokerurl import BrokerURL, parse_broker, parse_broker_list
from spotfi_agent.config import ConfigError


def config_error_of(function, *args):
    try:
        function(*args)
    except ConfigError as error:
        return error
    raise AssertionError("no ConfigError raised for %r" % (args,))


VALID = [
    ("mqtt://broker.example.com", "broker.example.com", 1883, False),
    ("mqtt://broker.example.com:1884", "broker.example.com", 1884, False),
    ("mqtts://broker.example.com", "broker.example.com", 8883, True),
    ("mqtts://broker.example.com:443", "broker.example.com", 443, True),
    ("tcp://10.0.0.1:1883", "10.0.0.1", 1883, False),
    ("tcp://10.0.0.1", "10.0.0.1", 1883, False),
    ("ssl://broker.example.com", "broker.example.com", 8883, True),
    ("ssl://broker.example.com:9883", "broker.example.com", 9883, True),
    ("MQTTS://broker.example.com", "broker.example.com", 8883, True),
    ("broker.example.com:1884", "broker.example.com", 1884, False),
    ("broker.example.com", "broker.example.com", 1883, False),
    ("localhost", "localhost", 1883, False),
    ("mqtt://[::1]:1884", "::1", 1884, False),
    ("mqtts://[2001:db8::1]", "2001:db8::1", 8883, True),
    ("[fe80::1%eth0]:1883", "fe80::1%eth0", 1883, False),
    ("[::ffff:10.0.0.1]", "::ffff:10.0.0.1", 1883, False),
    ("mqtt://broker.example.com/", "broker.example.com", 1883, False),
    ("mqtts://broker.example.com:8883/", "broker.example.com", 8883, True),
    ("  mqtt://broker.example.com  ", "broker.example.com", 1883, False),
    ("mqtt://broker.example.com\n", "broker.example.com", 1883, False),
    ("mqtt://my_broker.lan", "my_broker.lan", 1883, False),
]


def test_parse_broker_valid_forms():
    for text, host, port, tls in VALID:
        broker = parse_broker(text)
        assert broker.host == host, text
        assert broker.port == port, text
        assert broker.tls is tls, text


def test_parse_broker_display():
    assert parse_broker("ssl://broker.example.com").display == "mqtts://broker.example.com:8883"
    assert parse_broker("tcp://h").display == "mqtt://h:1883"
    assert parse_broker("[::1]:1884").display == "mqtt://[::1]:1884"
    assert str(parse_broker("mqtts://h:9")) == "mqtts://h:9"


def test_parse_broker_path_dropped_with_warning(caplog):
    caplog.set_level(logging.WARNING, logger="spotfi_agent.brokerurl")
    broker = parse_broker("mqtt://broker.example.com:1884/mqtt")
    assert broker == BrokerURL("broker.example.com", 1884, False)
    assert "mqtt://broker.example.com:1884/mqtt" in caplog.text
    assert "dropped" in caplog.text


def test_parse_broker_query_dropped_with_warning(caplog):
    caplog.set_level(logging.WARNING, logger="spotfi_agent.brokerurl")
    broker = parse_broker("mqtts://broker.example.com?client=1")
    assert broker == BrokerURL("broker.example.com", 8883, True)
    assert "mqtts://broker.example.com?client=1" in caplog.text


def test_parse_broker_trailing_slash_no_warning(caplog):
    caplog.set_level(logging.WARNING, logger="spotfi_agent.brokerurl")
    parse_broker("mqtt://broker.example.com/")
    assert caplog.text == ""


def test_parse_broker_tls_port_without_scheme_warns(caplog):
    caplog.set_level(logging.WARNING, logger="spotfi_agent.brokerurl")
    broker = parse_broker("broker.example.com:8883")
    assert broker.tls is False
    assert "mqtts://broker.example.com:8883" in caplog.text


INVALID = [
    ("", "empty"),
    ("   ", "empty"),
    ("mqtt://", "empty host"),
    ("mqtt://:1883", "empty host"),
    ("ws://broker.example.com", "unsupported scheme 'ws'"),
    ("wss://broker.example.com", "unsupported scheme 'wss'"),
    ("http://broker.example.com", "unsupported scheme 'http'"),
    ("mqtt://broker.example.com:0", "out of range"),
    ("mqtt://broker.example.com:65536", "out of range"),
    ("mqtt://broker.example.com:abc", "invalid port 'abc'"),
    ("mqtt://broker.example.com:", "invalid port ''"),
    ("broker.example.com:-1", "invalid port"),
    ("mqtt://broker example.com", "whitespace"),
    ("mqtt://bro\x00ker", "control character"),
    ("mqtt://bro\tker", "whitespace"),
    ("mqtt://::1", "brackets"),
    ("mqtt://[::1", "missing ']'"),
    ("mqtt://[::1]x", "after ']'"),
    ("mqtt://[nothex]", "invalid IPv6"),
    ("mqtt://bro$ker", "invalid host name"),
    ("mqtt://.example.com", "invalid host name"),
]


def test_parse_broker_invalid_forms():
    for text, reason in INVALID:
        error = config_error_of(parse_broker, text)
        assert error.setting == "broker", text
        assert str(error).startswith("invalid broker "), text
        assert reason in str(error), (text, str(error))
        assert "SPOTFI_MQTT_BROKER" in str(error), text
        assert "uci set spotfi.main.broker=" in str(error), text


def test_parse_broker_error_names_value_and_source():
    error = config_error_of(parse_broker, "ws://broker.example.com", "UCI /etc/config/spotfi")
    assert "'ws://broker.example.com'" in str(error)
    assert "UCI /etc/config/spotfi" in str(error)
    assert "mqtts://" in str(error)
    assert "\n" not in str(error)


def test_parse_broker_credentials_rejected_without_password():
    error = config_error_of(parse_broker, "mqtt://user:hunter2@broker.example.com")
    assert error.setting == "broker"
    assert "hunter2" not in str(error)
    assert "broker.example.com" in str(error)


def test_parse_broker_list_comma_separated():
    brokers = parse_broker_list("mqtts://a.example.com, b.example.com:1884 ,ssl://c")
    assert [broker.display for broker in brokers] == [
        "mqtts://a.example.com:8883",
        "mqtt://b.example.com:1884",
        "mqtts://c:8883",
    ]


def test_parse_broker_list_from_uci_list():
    brokers = parse_broker_list(["mqtts://a.example.com", "tcp://b.example.com,ssl://c"])
    assert [broker.host for broker in brokers] == ["a.example.com", "b.example.com", "c"]
    assert [broker.tls for broker in brokers] == [True, False, True]


def test_parse_broker_list_skips_empty_items():
    brokers = parse_broker_list("mqtt://a,,mqtt://b,")
    assert [broker.host for broker in brokers] == ["a", "b"]


def test_parse_broker_list_drops_duplicates(caplog):
    caplog.set_level(logging.WARNING, logger="spotfi_agent.brokerurl")
    brokers = parse_broker_list("mqtt://a, tcp://a:1883")
    assert brokers == [BrokerURL("a", 1883, False)]
    assert "listed twice" in caplog.text


def test_parse_broker_list_empty_is_error():
    error = config_error_of(parse_broker_list, " , ")
    assert error.setting == "broker"
    assert "no broker address" in str(error)


def test_parse_broker_list_one_bad_item_is_error():
    error = config_error_of(parse_broker_list, ["mqtt://a", "ws://b"])
    assert "'ws://b'" in str(error)
