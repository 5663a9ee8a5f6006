"""MQTT topic names of docs/protocol.md and the parser for incoming topics."""

import dataclasses

PREFIX = "spotfi/router/"
SHARED_GROUP = "$share/api_cluster/"

# Router ids come from one topic level, so '/', '+' and '#' cannot occur there.
# Whitespace and control characters are rejected too, because the id is also
# part of Redis keys, SQL rows and HTTP paths.
MAX_ROUTER_ID_LENGTH = 128


@dataclasses.dataclass(frozen=True)
class RouterTopic:
    """An incoming topic split into router id, kind and optional instance id."""

    router_id: str
    kind: str  # "metrics", "status", "rpc/response" or "x/out"
    instance_id: str | None


def router_id_problem(router_id):
    """Return why `router_id` is not a valid router id, or None when it is valid."""
    if not router_id:
        return "the router id is empty"
    if len(router_id) > MAX_ROUTER_ID_LENGTH:
        return "the router id is longer than %d characters" % MAX_ROUTER_ID_LENGTH
    for char in router_id:
        if char in "/+#" or char.isspace() or not char.isprintable():
            return "the router id contains %r" % char
    return None


def subscriptions(instance_id):
    """Return the (topic filter, QoS) pairs one instance subscribes to."""
    return [
        (SHARED_GROUP + PREFIX + "+/metrics", 0),
        (SHARED_GROUP + PREFIX + "+/status", 1),
        (PREFIX + "+/rpc/response", 1),
        (PREFIX + "+/rpc/response/" + instance_id, 1),
        (PREFIX + "+/x/out", 0),
        (PREFIX + "+/x/out/" + instance_id, 0),
    ]


def rpc_request(router_id):
    return PREFIX + router_id + "/rpc/request"


def rpc_response(router_id, instance_id):
    return PREFIX + router_id + "/rpc/response/" + instance_id


def terminal_in(router_id):
    return PREFIX + router_id + "/x/in"


def terminal_out(router_id, instance_id):
    return PREFIX + router_id + "/x/out/" + instance_id


def parse_topic(topic):
    """Split an incoming topic, or return None when this API does not handle it."""
    if not topic.startswith(PREFIX):
        return None
    levels = topic[len(PREFIX):].split("/")
    router_id = levels[0]
    rest = levels[1:]
    if rest in (["metrics"], ["status"]):
        return RouterTopic(router_id, rest[0], None)
    if rest[:2] in (["rpc", "response"], ["x", "out"]) and len(rest) <= 3:
        instance_id = rest[2] if len(rest) == 3 else None
        return RouterTopic(router_id, rest[0] + "/" + rest[1], instance_id)
    return None
