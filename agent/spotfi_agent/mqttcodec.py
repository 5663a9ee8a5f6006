"""MQTT 3.1.1 and 5.0 packet encoding and decoding (OASIS MQTT Version 3.1.1 and
Version 5.0, sections 2-3).

Pure functions over bytes, shared by the agent's own client on CPython and
MicroPython. Only what a client needs is here: it never decodes CONNECT or
SUBSCRIBE and never encodes CONNACK or SUBACK. `version` arguments take the
protocol level of the CONNECT packet: 4 for MQTT 3.1.1, 5 for MQTT 5.0.
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

MQTT_V311 = 4
MQTT_V5 = 5

# CONNACK return codes of MQTT 3.1.1.
CONNACK_CODES = {
    1: "unacceptable protocol version",
    2: "client identifier rejected",
    3: "server unavailable",
    4: "bad username or password",
    5: "not authorized",
}


# MQTT 5 reason codes of 0x80 and above, which mean a failure in every packet
# type that carries one (MQTT 5.0, section 2.4).
REASON_CODES = {
    0x80: "unspecified error",
    0x81: "malformed packet",
    0x82: "protocol error",
    0x83: "implementation specific error",
    0x84: "unsupported protocol version",
    0x85: "client identifier not valid",
    0x86: "bad username or password",
    0x87: "not authorized",
    0x88: "server unavailable",
    0x89: "server busy",
    0x8A: "banned",
    0x8B: "server shutting down",
    0x8C: "bad authentication method",
    0x8D: "keep alive timeout",
    0x8E: "session taken over",
    0x8F: "topic filter invalid",
    0x90: "topic name invalid",
    0x91: "packet identifier in use",
    0x92: "packet identifier not found",
    0x93: "receive maximum exceeded",
    0x94: "topic alias invalid",
    0x95: "packet too large",
    0x96: "message rate too high",
    0x97: "quota exceeded",
    0x98: "administrative action",
    0x99: "payload format invalid",
    0x9A: "retain not supported",
    0x9B: "QoS not supported",
    0x9C: "use another server",
    0x9D: "server moved",
    0x9E: "shared subscriptions not supported",
    0x9F: "connection rate exceeded",
    0xA0: "maximum connect time",
    0xA1: "subscription identifiers not supported",
    0xA2: "wildcard subscriptions not supported",
}

# MQTT 5 properties (MQTT 5.0, section 2.2.2.2) that the client reads or writes.
RESPONSE_TOPIC = 0x08
CORRELATION_DATA = 0x09
SERVER_KEEP_ALIVE = 0x13
REASON_STRING = 0x1F
RECEIVE_MAXIMUM = 0x21
USER_PROPERTY = 0x26
MAXIMUM_PACKET_SIZE = 0x27

# Value types of MQTT 5 properties. The fixed-size integers are numbered by
# their size in bytes.
_BYTE = 1
_TWO_BYTE_INTEGER = 2
_FOUR_BYTE_INTEGER = 4
_VARIABLE_BYTE_INTEGER = 5
_BINARY_DATA = 6
_STRING = 7
_STRING_PAIR = 8

# The type of every property the standard defines, so that a property the
# client does not use is skipped by its length rather than ending the parse.
_PROPERTY_TYPES = {
    0x01: _BYTE,  # Payload Format Indicator
    0x02: _FOUR_BYTE_INTEGER,  # Message Expiry Interval
    0x03: _STRING,  # Content Type
    0x08: _STRING,  # Response Topic
    0x09: _BINARY_DATA,  # Correlation Data
    0x0B: _VARIABLE_BYTE_INTEGER,  # Subscription Identifier
    0x11: _FOUR_BYTE_INTEGER,  # Session Expiry Interval
    0x12: _STRING,  # Assigned Client Identifier
    0x13: _TWO_BYTE_INTEGER,  # Server Keep Alive
    0x15: _STRING,  # Authentication Method
    0x16: _BINARY_DATA,  # Authentication Data
    0x17: _BYTE,  # Request Problem Information
    0x18: _FOUR_BYTE_INTEGER,  # Will Delay Interval
    0x19: _BYTE,  # Request Response Information
    0x1A: _STRING,  # Response Information
    0x1C: _STRING,  # Server Reference
    0x1F: _STRING,  # Reason String
    0x21: _TWO_BYTE_INTEGER,  # Receive Maximum
    0x22: _TWO_BYTE_INTEGER,  # Topic Alias Maximum
    0x23: _TWO_BYTE_INTEGER,  # Topic Alias
    0x24: _BYTE,  # Maximum QoS
    0x25: _BYTE,  # Retain Available
    0x26: _STRING_PAIR,  # User Property
    0x27: _FOUR_BYTE_INTEGER,  # Maximum Packet Size
    0x28: _BYTE,  # Wildcard Subscription Available
    0x29: _BYTE,  # Subscription Identifier Available
    0x2A: _BYTE,  # Shared Subscription Available
}

_INTEGER_FORMATS = {_TWO_BYTE_INTEGER: "!H", _FOUR_BYTE_INTEGER: "!I"}


class ProtocolError(Exception):
    """Raised when bytes from the broker are not a valid MQTT 3.1.1 or 5.0 packet."""


def describe_reason(code):
    """Return the name and number of an MQTT 5 reason code, e.g. "not authorized (reason code 0x87)"."""
    return "%s (reason code 0x%02X)" % (REASON_CODES.get(code, "unknown reason"), code)


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


def encode_properties(properties):
    """Encode an MQTT 5 property block from {identifier: value}, or an empty block for None.

    Values are int for integer types, bytes for binary data, str (or UTF-8
    bytes) for strings, and a list of (name, value) pairs for User Property.
    """
    body = b""
    for identifier in sorted(properties or ()):
        kind = _PROPERTY_TYPES.get(identifier)
        if kind is None:
            raise ValueError("unknown MQTT 5 property identifier 0x%02X" % identifier)
        value = properties[identifier]
        if kind == _STRING_PAIR:
            for name, text in value:
                body += bytes([identifier]) + _encode_string(name) + _encode_string(text)
            continue
        body += bytes([identifier])
        if kind == _BYTE:
            body += bytes([value])
        elif kind == _VARIABLE_BYTE_INTEGER:
            body += encode_remaining_length(value)
        elif kind in _INTEGER_FORMATS:
            body += struct.pack(_INTEGER_FORMATS[kind], value)
        else:
            # Binary data and strings share the two-byte length prefix.
            body += _encode_string(value)
    return encode_remaining_length(len(body)) + body


def encode_connect(client_id, keepalive, username=None, password=None, will=None,
                   clean_session=True, version=MQTT_V311):
    """Encode CONNECT. `will` is (topic, payload bytes, qos, retain) or None.

    MQTT 5 connections carry empty property blocks for the connection and the
    will. Clean start then means what clean session means in MQTT 3.1.1,
    because a missing Session Expiry Interval ends the session with the
    connection.
    """
    flags = 0
    if clean_session:
        flags |= 0x02
    payload = _encode_string(client_id)
    if will is not None:
        topic, message, qos, retain = will
        flags |= 0x04 | (qos << 3)
        if retain:
            flags |= 0x20
        if version == MQTT_V5:
            payload += b"\x00"
        payload += _encode_string(topic) + _encode_string(message)
    if username is not None:
        flags |= 0x80
        payload += _encode_string(username)
        if password is not None:
            flags |= 0x40
            payload += _encode_string(password)
    header = _encode_string("MQTT") + struct.pack("!BBH", version, flags, keepalive)
    if version == MQTT_V5:
        header += b"\x00"
    return _packet(0x10, header + payload)


def encode_publish(topic, payload, qos=0, retain=False, packet_id=0, dup=False, properties=None):
    """Encode PUBLISH. `properties` is None under MQTT 3.1.1 and a dict, maybe empty, under 5."""
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
    if properties is not None:
        body += encode_properties(properties)
    return _packet(first, body + payload)


def encode_subscribe(packet_id, topics, version=MQTT_V311):
    """Encode SUBSCRIBE for a list of (topic filter, max qos).

    In MQTT 5 the byte after each filter carries more subscription options,
    all left at 0, so local messages are delivered and retained ones are sent.
    """
    body = struct.pack("!H", packet_id)
    if version == MQTT_V5:
        body += b"\x00"
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


def decode_variable_integer(body, position):
    """Return (value, position after it) of the Variable Byte Integer at `position`."""
    value = 0
    multiplier = 1
    for _ in range(4):
        if position >= len(body):
            raise ProtocolError("variable byte integer runs past the packet")
        digit = body[position]
        position += 1
        value += (digit & 0x7F) * multiplier
        if not digit & 0x80:
            return value, position
        multiplier *= 128
    raise ProtocolError("variable byte integer uses more than 4 bytes")


def _decode_string(body, position, end, label):
    if position + 2 > end:
        raise ProtocolError("%s runs past its packet" % label)
    length = struct.unpack("!H", body[position:position + 2])[0]
    start = position + 2
    if start + length > end:
        raise ProtocolError("%s runs past its packet" % label)
    return bytes(body[start:start + length]), start + length


def _decode_text(body, position, end, label):
    data, position = _decode_string(body, position, end, label)
    try:
        return data.decode("utf-8"), position
    except UnicodeError:
        raise ProtocolError("%s is not UTF-8" % label)


def decode_properties(body, position):
    """Return ({identifier: value}, position after the block) of the MQTT 5 property block at `position`.

    Every property the standard defines is decoded, so unknown ones cannot
    shift the parse. User Property values are a list of (name, value) pairs.
    """
    length, position = decode_variable_integer(body, position)
    end = position + length
    if end > len(body):
        raise ProtocolError("property block of %d bytes runs past the packet" % length)
    properties = {}
    while position < end:
        identifier, position = decode_variable_integer(body, position)
        kind = _PROPERTY_TYPES.get(identifier)
        label = "property 0x%02X" % identifier
        if kind is None:
            raise ProtocolError("unknown property identifier 0x%02X" % identifier)
        if kind == _BYTE:
            if position >= end:
                raise ProtocolError("%s runs past its block" % label)
            value = body[position]
            position += 1
        elif kind in _INTEGER_FORMATS:
            size = kind
            if position + size > end:
                raise ProtocolError("%s runs past its block" % label)
            value = struct.unpack(_INTEGER_FORMATS[kind], body[position:position + size])[0]
            position += size
        elif kind == _VARIABLE_BYTE_INTEGER:
            value, position = decode_variable_integer(body, position)
        elif kind == _BINARY_DATA:
            value, position = _decode_string(body, position, end, label)
        elif kind == _STRING:
            value, position = _decode_text(body, position, end, label)
        else:
            name, position = _decode_text(body, position, end, label)
            text, position = _decode_text(body, position, end, label)
            value = properties.get(identifier, []) + [(name, text)]
        properties[identifier] = value
    if position != end:
        raise ProtocolError("last property runs past its block")
    return properties, end


def decode_connack(body, version=MQTT_V311):
    """Return (session present, return or reason code, properties) of a CONNACK body.

    Under MQTT 5 a two-byte CONNACK is accepted too, because a broker that
    supports only MQTT 3.1.1 rejects a version 5 CONNECT with one (return code 1).
    """
    if len(body) < 2 or (version != MQTT_V5 and len(body) != 2):
        raise ProtocolError("CONNACK of %d bytes" % len(body))
    properties = {}
    if len(body) > 2:
        properties, end = decode_properties(body, 2)
    return bool(body[0] & 0x01), body[1], properties


def decode_publish(flags, body, version=MQTT_V311):
    """Return (topic, payload, qos, retain, packet id, properties) of a PUBLISH body.

    `properties` is None under MQTT 3.1.1.
    """
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
    properties = None
    if version == MQTT_V5:
        properties, position = decode_properties(body, position)
    return topic, body[position:], qos, bool(flags & 0x01), packet_id, properties


def decode_packet_id(body):
    if len(body) < 2:
        raise ProtocolError("acknowledgement without a packet id")
    return struct.unpack("!H", body[:2])[0]


def decode_ack(body):
    """Return (packet id, reason code, properties) of PUBACK, PUBREC, PUBREL or PUBCOMP.

    MQTT 5 leaves out the reason code when it is 0 and the properties when
    there are none, so one parse serves both versions.
    """
    packet_id = decode_packet_id(body)
    code = body[2] if len(body) > 2 else 0
    properties = {}
    if len(body) > 3:
        properties, end = decode_properties(body, 3)
    return packet_id, code, properties


def decode_suback(body, version=MQTT_V311):
    """Return (packet id, [return or reason code per filter], properties) of a SUBACK body."""
    packet_id = decode_packet_id(body)
    position = 2
    properties = {}
    if version == MQTT_V5:
        properties, position = decode_properties(body, position)
    return packet_id, list(body[position:]), properties


def decode_disconnect(body):
    """Return (reason code, properties) of an MQTT 5 DISCONNECT body, where an empty body means 0."""
    if not body:
        return 0, {}
    properties = {}
    if len(body) > 1:
        properties, end = decode_properties(body, 1)
    return body[0], properties
