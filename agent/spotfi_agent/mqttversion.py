"""Which MQTT protocol version each broker gets, learnt from its CONNACKs.

Both transports ask a VersionChooser before each CONNECT and tell it how the
attempt ended. With option mqtt_version '5' a broker gets MQTT 5 until it
shows that it speaks only MQTT 3.1.1, in one of two ways:

- it refuses version 5 in its CONNACK (MQTT 3.1.1 return code 1, or MQTT 5
  reason code 0x84): the client connects again at once with 3.1.1;
- it sends no CONNACK for an MQTT 5 CONNECT, because the connection times
  out or closes first. amqtt 0.12 does so when the CONNECT carries a will
  or a username. The next attempt then uses 3.1.1, and the one after that
  uses 5 again if 3.1.1 got no CONNACK either.

Either way, once the broker accepts 3.1.1 it keeps getting 3.1.1 until the
agent restarts, and the change is logged once. With mqtt_version '3.1.1'
every broker gets 3.1.1.
"""

from spotfi_agent.log import get_logger

log = get_logger(__name__)

MQTT_5 = "5"
MQTT_311 = "3.1.1"


class VersionChooser:
    """The protocol version for each broker ("host:port") of one client."""

    def __init__(self, client_id):
        self.client_id = client_id
        # Brokers that get MQTT 3.1.1 from now on.
        self._mqtt311 = set()
        # Brokers that sent no CONNACK for an MQTT 5 CONNECT. The next attempt tries 3.1.1.
        self._unanswered = set()

    def version_for(self, peer, configured):
        """Return the version to send in the next CONNECT to peer under option mqtt_version `configured`."""
        if configured == MQTT_311 or peer in self._mqtt311 or peer in self._unanswered:
            return MQTT_311
        return MQTT_5

    def rejected(self, peer, refusal):
        """Record that peer refused MQTT 5 with `refusal` (a reason text)."""
        self._mqtt311.add(peer)
        self._unanswered.discard(peer)
        log.warning("client %s: broker %s rejected MQTT 5 with %s; connecting again with MQTT"
                    " 3.1.1, which this broker gets from now on", self.client_id, peer, refusal)

    def unanswered(self, peer, version):
        """Record that a CONNECT of `version` to peer ended before any CONNACK."""
        if peer in self._mqtt311:
            return
        if version == MQTT_5:
            self._unanswered.add(peer)
            log.info("client %s: broker %s sent no CONNACK for an MQTT 5 CONNECT; the next"
                     " attempt uses MQTT 3.1.1", self.client_id, peer)
        else:
            self._unanswered.discard(peer)

    def accepted(self, peer, version):
        """Record that peer accepted a CONNECT of `version`."""
        if version == MQTT_311 and peer in self._unanswered:
            self._unanswered.discard(peer)
            self._mqtt311.add(peer)
            log.warning("client %s: broker %s sent no CONNACK for MQTT 5 but accepted MQTT"
                        " 3.1.1, which it gets from now on", self.client_id, peer)
