"""The MQTT topics of one router, as the Go bridge named them."""


class Topics:
    """Topic names for router `router_id`."""

    def __init__(self, router_id):
        self.router_id = router_id
        self.prefix = "spotfi/router/%s/" % router_id
        self.status = self.prefix + "status"
        self.metrics = self.prefix + "metrics"
        self.rpc_request = self.prefix + "rpc/request"
        self.rpc_response = self.prefix + "rpc/response"
        self.x_in = self.prefix + "x/in"
        self.x_out = self.prefix + "x/out"

    def is_own(self, topic):
        """Return True for a concrete topic under this router's prefix."""
        return (isinstance(topic, str) and topic.startswith(self.prefix)
                and len(topic) > len(self.prefix) and "+" not in topic and "#" not in topic)

    def is_go_era_reply(self, topic):
        """Return True for `spotfi/api/{instance}/x/out`, the Go-era terminal reply topic."""
        if not isinstance(topic, str) or "+" in topic or "#" in topic:
            return False
        parts = topic.split("/")
        return (len(parts) == 5 and parts[0] == "spotfi" and parts[1] == "api"
                and parts[2] != "" and parts[3] == "x" and parts[4] == "out")
