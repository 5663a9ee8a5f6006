"""MQTT 3.1.1 and 5.0 packet encoding and decoding, on CPython and MicroPython."""

from mpytest import raises

from spotfi_agent import mqttcodec


def test_remaining_length_boundaries():
    cases = [
        (0, b"\x00"),
        (127, b"\x7f"),
        (128, b"\x80\x01"),
        (16383, b"\xff\x7f"),
        (16384, b"\x80\x80\x01"),
        (2097151, b"\xff\xff\x7f"),
        (2097152, b"\x80\x80\x80\x01"),
        (268435455, b"\xff\xff\xff\x7f"),
    ]
    for length, encoded in cases:
        assert mqttcodec.encode_remaining_length(length) == encoded, length


def test_remaining_length_over_maximum():
    error = raises(ValueError, mqttcodec.encode_remaining_length, 268435456)
    assert "268435456" in str(error)


def test_connect_with_will_and_credentials():
    packet = mqttcodec.encode_connect("router-r1", 60, "r1", "secret",
                                      ("spotfi/router/r1/status", b"OFFLINE", 1, True))
    expected_body = (b"\x00\x04MQTT\x04" + bytes([0x02 | 0x04 | 0x08 | 0x20 | 0x80 | 0x40])
                     + b"\x00\x3c"
                     + b"\x00\x09router-r1"
                     + b"\x00\x17spotfi/router/r1/status" + b"\x00\x07OFFLINE"
                     + b"\x00\x02r1" + b"\x00\x06secret")
    assert packet[0] == 0x10
    assert packet[1] == len(expected_body)
    assert packet[2:] == expected_body


def test_connect_without_will_or_password():
    packet = mqttcodec.encode_connect("c", 10, "user")
    flags = packet[9]
    assert flags == 0x02 | 0x80
    assert packet.endswith(b"\x00\x01c\x00\x04user")


def test_publish_qos1_retain_dup():
    packet = mqttcodec.encode_publish("a/b", b"hi", 1, True, 0x1234, True)
    assert packet[0] == 0x30 | 0x02 | 0x01 | 0x08
    assert packet[1] == 2 + 3 + 2 + 2
    assert packet[2:] == b"\x00\x03a/b\x12\x34hi"


def test_publish_qos0_text_payload():
    packet = mqttcodec.encode_publish("t", "é")
    assert packet == b"\x30\x05\x00\x01t\xc3\xa9"


def test_subscribe_and_acks():
    packet = mqttcodec.encode_subscribe(7, [("a/#", 1), ("b", 0)])
    assert packet == b"\x82\x0c\x00\x07\x00\x03a/#\x01\x00\x01b\x00"
    assert mqttcodec.encode_ack(mqttcodec.PUBACK, 258) == b"\x40\x02\x01\x02"
    assert mqttcodec.encode_ack(mqttcodec.PUBREL, 1) == b"\x62\x02\x00\x01"
    assert mqttcodec.encode_ack(mqttcodec.PUBCOMP, 1) == b"\x70\x02\x00\x01"


def test_split_packet_needs_more_bytes():
    whole = mqttcodec.encode_publish("topic", b"x" * 200)
    for size in (0, 1, 2, 3, len(whole) - 1):
        assert mqttcodec.split_packet(bytearray(whole[:size]), 1000) is None, size


def test_split_packet_returns_first_packet():
    first = mqttcodec.encode_publish("a", b"1")
    second = mqttcodec.PINGREQ_PACKET
    packet_type, flags, body, used = mqttcodec.split_packet(bytearray(first + second), 1000)
    assert packet_type == mqttcodec.PUBLISH
    assert flags == 0
    assert body == b"\x00\x01a1"
    assert used == len(first)


def test_split_packet_rejects_long_length_field():
    error = raises(mqttcodec.ProtocolError, mqttcodec.split_packet,
                   bytearray(b"\x30\xff\xff\xff\xff\x01"), 1 << 30)
    assert "4 bytes" in str(error)


def test_split_packet_rejects_oversized_packet():
    error = raises(mqttcodec.ProtocolError, mqttcodec.split_packet,
                   bytearray(b"\x30\x80\x01"), 100)
    assert "128" in str(error)


def test_decode_publish_qos1():
    body = b"\x00\x03a/b\x00\x2apayload"
    topic, payload, qos, retain, packet_id, properties = mqttcodec.decode_publish(0x02 | 0x01,
                                                                                 body)
    assert topic == "a/b"
    assert payload == b"payload"
    assert qos == 1
    assert retain is True
    assert packet_id == 42
    assert properties is None


def test_decode_publish_invalid():
    cases = [
        (0x06, b"\x00\x01a"),  # QoS 3
        (0x00, b"\x00"),  # no topic length
        (0x00, b"\x00\x09ab"),  # topic runs past the packet
        (0x02, b"\x00\x01a\x00"),  # QoS 1 without a whole packet id
        (0x00, b"\x00\x02\xff\xfe"),  # topic is not UTF-8
    ]
    for flags, body in cases:
        raises(mqttcodec.ProtocolError, mqttcodec.decode_publish, flags, body)


def test_decode_packet_id_short():
    assert mqttcodec.decode_packet_id(b"\x01\x00") == 256
    raises(mqttcodec.ProtocolError, mqttcodec.decode_packet_id, b"\x01")


# MQTT 5.0.

def test_v5_connect_with_will_and_credentials():
    packet = mqttcodec.encode_connect("router-r1", 60, "r1", "secret",
                                      ("spotfi/router/r1/status", b"OFFLINE", 1, True), True,
                                      mqttcodec.MQTT_V5)
    expected_body = (b"\x00\x04MQTT\x05" + bytes([0x02 | 0x04 | 0x08 | 0x20 | 0x80 | 0x40])
                     + b"\x00\x3c" + b"\x00"
                     + b"\x00\x09router-r1"
                     + b"\x00" + b"\x00\x17spotfi/router/r1/status" + b"\x00\x07OFFLINE"
                     + b"\x00\x02r1" + b"\x00\x06secret")
    assert packet[0] == 0x10
    assert packet[1] == len(expected_body)
    assert packet[2:] == expected_body


def test_v5_connect_without_will():
    packet = mqttcodec.encode_connect("c", 10, None, None, None, True, mqttcodec.MQTT_V5)
    assert packet == b"\x10\x0e\x00\x04MQTT\x05\x02\x00\x0a\x00\x00\x01c"


def test_v5_publish_with_properties():
    packet = mqttcodec.encode_publish("a", b"hi", 1, False, 5, False,
                                      {mqttcodec.CORRELATION_DATA: b"\x00\xff",
                                       mqttcodec.RESPONSE_TOPIC: "r/1"})
    properties = b"\x08\x00\x03r/1" + b"\x09\x00\x02\x00\xff"
    body = b"\x00\x01a\x00\x05" + bytes([len(properties)]) + properties + b"hi"
    assert packet == bytes([0x32, len(body)]) + body


def test_v5_publish_empty_properties():
    assert mqttcodec.encode_publish("t", b"x", 0, False, 0, False, {}) == b"\x30\x05\x00\x01t\x00x"


def test_v5_publish_round_trip():
    sent = {mqttcodec.RESPONSE_TOPIC: "spotfi/router/r1/rpc/response/api-2",
            mqttcodec.CORRELATION_DATA: bytes(range(256))}
    packet = mqttcodec.encode_publish("spotfi/router/r1/rpc/request", b"{}", 1, True, 9, False,
                                      sent)
    packet_type, flags, body, used = mqttcodec.split_packet(bytearray(packet), 1000)
    topic, payload, qos, retain, packet_id, properties = mqttcodec.decode_publish(
        flags, body, mqttcodec.MQTT_V5)
    assert topic == "spotfi/router/r1/rpc/request"
    assert payload == b"{}"
    assert (qos, retain, packet_id) == (1, True, 9)
    assert properties == sent


def test_v5_properties_of_every_type_decoded():
    block = (b"\x01\x01"  # Payload Format Indicator, byte
             + b"\x02\x00\x00\x0e\x10"  # Message Expiry Interval, four bytes
             + b"\x03\x00\x04text"  # Content Type, string
             + b"\x0b\x80\x01"  # Subscription Identifier, variable byte integer 128
             + b"\x23\x00\x07"  # Topic Alias, two bytes
             + b"\x26\x00\x01k\x00\x01v"  # User Property, string pair
             + b"\x26\x00\x01k\x00\x02v2"
             + b"\x09\x00\x01\x2a")  # Correlation Data, binary
    body = bytes([len(block)]) + block + b"rest"
    properties, end = mqttcodec.decode_properties(body, 0)
    assert body[end:] == b"rest"
    assert properties[0x01] == 1
    assert properties[0x02] == 3600
    assert properties[0x03] == "text"
    assert properties[0x0B] == 128
    assert properties[0x23] == 7
    assert properties[mqttcodec.USER_PROPERTY] == [("k", "v"), ("k", "v2")]
    assert properties[mqttcodec.CORRELATION_DATA] == b"\x2a"


def test_v5_properties_encode_every_type():
    sent = {0x01: 1, 0x02: 3600, 0x0B: 300, 0x13: 30, mqttcodec.REASON_STRING: "why",
            mqttcodec.CORRELATION_DATA: b"\x00", mqttcodec.USER_PROPERTY: [("a", "b")]}
    properties, end = mqttcodec.decode_properties(mqttcodec.encode_properties(sent), 0)
    assert properties == sent
    assert mqttcodec.encode_properties(None) == b"\x00"
    raises(ValueError, mqttcodec.encode_properties, {0x7F: 1})


def test_v5_properties_invalid():
    cases = [
        b"\x05\x7f\x00\x00\x00\x00",  # unknown identifier 0x7F
        b"\x09\x08\x00\x01a",  # block longer than the packet
        b"\x03\x08\x00\x05abc",  # string longer than its block
        b"\x02\x02\x00",  # four-byte integer cut short
        b"\x04\x03\x00\x02\xff",  # content type not UTF-8, cut short
        b"\x05\x03\x00\x02\xff\xfe",  # content type not UTF-8
        b"\x02\x0b\x80",  # variable byte integer cut short
        b"\x80\x80\x80\x80\x01",  # block length of 5 bytes
    ]
    for body in cases:
        raises(mqttcodec.ProtocolError, mqttcodec.decode_properties, body, 0)


def test_v5_connack_with_properties():
    body = b"\x01\x00\x08\x13\x00\x1e\x21\x00\x14\x24\x01"
    session_present, code, properties = mqttcodec.decode_connack(body, mqttcodec.MQTT_V5)
    assert session_present is True
    assert code == 0
    assert properties == {mqttcodec.SERVER_KEEP_ALIVE: 30, mqttcodec.RECEIVE_MAXIMUM: 20, 0x24: 1}


def test_v5_connack_from_mqtt311_broker():
    # A broker that supports only MQTT 3.1.1 rejects a version 5 CONNECT so.
    assert mqttcodec.decode_connack(b"\x00\x01", mqttcodec.MQTT_V5) == (False, 1, {})


def test_connack_length_checked():
    raises(mqttcodec.ProtocolError, mqttcodec.decode_connack, b"\x00\x00\x00")
    raises(mqttcodec.ProtocolError, mqttcodec.decode_connack, b"\x00", mqttcodec.MQTT_V5)
    assert mqttcodec.decode_connack(b"\x00\x05") == (False, 5, {})


def test_v5_subscribe():
    packet = mqttcodec.encode_subscribe(7, [("a/#", 1), ("b", 0)], mqttcodec.MQTT_V5)
    assert packet == b"\x82\x0d\x00\x07\x00\x00\x03a/#\x01\x00\x01b\x00"


def test_v5_suback_reason_codes():
    body = b"\x00\x07\x04\x1f\x00\x01x\x01\x87"
    packet_id, codes, properties = mqttcodec.decode_suback(body, mqttcodec.MQTT_V5)
    assert packet_id == 7
    assert codes == [0x01, 0x87]
    assert properties == {mqttcodec.REASON_STRING: "x"}
    assert mqttcodec.decode_suback(b"\x00\x07\x01\x80") == (7, [0x01, 0x80], {})


def test_v5_puback_forms():
    assert mqttcodec.decode_ack(b"\x00\x03") == (3, 0, {})
    assert mqttcodec.decode_ack(b"\x00\x03\x10") == (3, 0x10, {})
    assert mqttcodec.decode_ack(b"\x00\x03\x87\x00") == (3, 0x87, {})
    assert mqttcodec.decode_ack(b"\x00\x03\x87\x04\x1f\x00\x01x") == \
        (3, 0x87, {mqttcodec.REASON_STRING: "x"})


def test_v5_disconnect_forms():
    assert mqttcodec.decode_disconnect(b"") == (0, {})
    assert mqttcodec.decode_disconnect(b"\x8e") == (0x8E, {})
    assert mqttcodec.decode_disconnect(b"\x9a\x05\x1f\x00\x02no") == \
        (0x9A, {mqttcodec.REASON_STRING: "no"})


def test_describe_reason():
    assert mqttcodec.describe_reason(0x8E) == "session taken over (reason code 0x8E)"
    assert mqttcodec.describe_reason(0xF0) == "unknown reason (reason code 0xF0)"
