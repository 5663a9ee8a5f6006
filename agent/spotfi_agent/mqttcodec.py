"""MQTT 3.1.1 packet encoding and decoding (OASIS MQTT Version 3.1.1, section 2-3).

Pure functions over bytes, shared by the agent's own client on CPython and
MicroPython. Only what a client needs is here: it never decodes CONNECT or
SUBSCRIBE and never encodes CONNACK or SUBACK.
"""

import struct

CONNECT = 1
CONNACK = 2
PUBLISH = 3
PUBACK = 4
PUBREC = 5
PUBREL = 6
PUBCOMP = 7
SUBSCRIBE = 8
SUBACK = 9
PINGREQ = 12
PINGRESP = 13
DISCONNECT = 14

MAX_REMAINING_LENGTH = 268435455

CONNACK_CODES = {
    1: "unacceptable protocol version",
    2: "client identifier rejected",
    3: "server unavailable",
    4: "bad username or password",
    5: "not authorized",
}


class ProtocolError(Exception):
    """Raised when bytes from the broker are not a valid MQTT 3.1.1 packet."""


def _encode_string(value):
    if isinstance(value, str):
        value = value.encode("utf-8")
    if len(value) > 65535:
        raise ValueError("MQTT string of %d bytes is longer than 65535" % len(value))
    return struct.pack("!H", len(value)) + value


def encode_remaining_length(length):
    if length > MAX_REMAINING_LENGTH:
        raise ValueError("MQTT packet of %d bytes is over the protocol maximum" % length)
    encoded = bytearray()
    while True:
        digit = length % 128
        length //= 128
        if length:
            digit |= 0x80
        encoded.append(digit)
        if not length:
            return bytes(encoded)


def _packet(first_byte, body):
    return bytes([first_byte]) + encode_remaining_length(len(body)) + body


def encode_connect(client_id, keepalive, username=None, password=None, will=None,
                   clean_session=True):
    """Encode CONNECT; `will` is (topic, payload bytes, qos, retain) or None."""
    flags = 0
    if clean_session:
        flags |= 0x02
    payload = _encode_string(client_id)
    if will is not None:
        topic, message, qos, retain = will
        flags |= 0x04 | (qos << 3)
        if retain:
            flags |= 0x20
        payload += _encode_string(topic) + _encode_string(message)
    if username is not None:
        flags |= 0x80
        payload += _encode_string(username)
        if password is not None:
            flags |= 0x40
            payload += _encode_string(password)
    header = _encode_string("MQTT") + struct.pack("!BBH", 4, flags, keepalive)
    return _packet(0x10, header + payload)


def encode_publish(topic, payload, qos=0, retain=False, packet_id=0, dup=False):
    if isinstance(payload, str):
        payload = payload.encode("utf-8")
    first = 0x30 | (qos << 1)
    if retain:
        first |= 0x01
    if dup:
        first |= 0x08
    body = _encode_string(topic)
    if qos:
        body += struct.pack("!H", packet_id)
    return _packet(first, body + payload)


def encode_subscribe(packet_id, topics):
    """Encode SUBSCRIBE for a list of (topic filter, max qos)."""
    body = struct.pack("!H", packet_id)
    for topic, qos in topics:
        body += _encode_string(topic) + bytes([qos])
    return _packet(0x82, body)


def encode_ack(packet_type, packet_id):
    """Encode PUBACK, PUBREC, PUBREL or PUBCOMP."""
    first = (packet_type << 4) | (0x02 if packet_type == PUBREL else 0)
    return bytes([first, 2]) + struct.pack("!H", packet_id)


PINGREQ_PACKET = b"\xc0\x00"
DISCONNECT_PACKET = b"\xe0\x00"


def split_packet(buffer, max_size):
    """Return (packet type, flags, body, bytes used) for the first whole packet in
    `buffer`, or None when more bytes are needed.
    """
    if len(buffer) < 2:
        return None
    length = 0
    multiplier = 1
    position = 1
    while True:
        if position >= len(buffer):
            return None
        digit = buffer[position]
        length += (digit & 0x7F) * multiplier
        position += 1
        if not digit & 0x80:
            break
        multiplier *= 128
        if position > 4:
            raise ProtocolError("remaining length uses more than 4 bytes")
    if length > max_size:
        raise ProtocolError("packet of %d bytes is over the %d byte limit" % (length, max_size))
    end = position + length
    if len(buffer) < end:
        return None
    first = buffer[0]
    return first >> 4, first & 0x0F, bytes(buffer[position:end]), end


def decode_publish(flags, body):
    """Return (topic, payload, qos, retain, packet id) of a PUBLISH body."""
    qos = (flags >> 1) & 0x03
    if qos == 3:
        raise ProtocolError("PUBLISH with QoS 3")
    if len(body) < 2:
        raise ProtocolError("PUBLISH too short for its topic length")
    topic_length = struct.unpack("!H", body[:2])[0]
    position = 2 + topic_length
    if len(body) < position:
        raise ProtocolError("PUBLISH topic runs past the packet")
    try:
        topic = body[2:position].decode("utf-8")
    except UnicodeError:
        raise ProtocolError("PUBLISH topic is not UTF-8")
    packet_id = 0
    if qos:
        if len(body) < position + 2:
            raise ProtocolError("PUBLISH with QoS %d has no packet id" % qos)
        packet_id = struct.unpack("!H", body[position:position + 2])[0]
        position += 2
    return topic, body[position:], qos, bool(flags & 0x01), packet_id


def decode_packet_id(body):
    if len(body) < 2:
        raise ProtocolError("acknowledgement without a packet id")
    return struct.unpack("!H", body[:2])[0]
