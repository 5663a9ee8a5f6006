"""MQTT 3.1.1 packet encoding and decoding, on CPython and MicroPython."""

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
    topic, payload, qos, retain, packet_id = mqttcodec.decode_publish(0x02 | 0x01, body)
    assert topic == "a/b"
    assert payload == b"payload"
    assert qos == 1
    assert retain is True
    assert packet_id == 42


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
