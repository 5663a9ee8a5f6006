"""Router id: the name of the router in MQTT topics, client id and user name.

An explicit router id is 1 to 64 characters of letters, digits, "_", "."
and "-", so it is always one MQTT topic level and never a wildcard.

When none is set, the id is derived from a MAC address and written as 12
lowercase hex digits without separators, e.g. "a0b1c2d3e4f5". A factory MAC
does not change across reboots or reflashing, and one fixed spelling (rather
than "A0:B1:..." or "a0-b1-...") keeps the id identical whichever file or
tool it was read from. The first usable MAC wins, in this order:

1. the label MAC in /etc/board.json (system.label_macaddr), the one printed
   on the device;
2. the LAN MAC in /etc/board.json (network.lan.macaddr);
3. /sys/class/net/br-lan/address;
4. /sys/class/net/eth0/address;
5. the first other interface, sorted by name, loopback excluded.

A MAC must be unicast and non-zero. MACs read from network interfaces must
also be globally administered, because an interface without a factory MAC
gets a random, locally administered one at each boot. The board.json values
may be locally administered: OpenWrt's board scripts derive some LAN MACs
from a factory MAC by setting that bit (macaddr_setbit_la in ath79's
02_network), and the file is written at first boot and kept.
"""

import os

from spotfi_agent import jsoncodec
from spotfi_agent.compat import path_join, read_text
from spotfi_agent.config import BOARD_JSON, SYS_CLASS_NET, invalid_setting, missing_setting, \
    system_path
from spotfi_agent.log import get_logger

log = get_logger(__name__)

MAX_LENGTH = 64
_ID_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-"
_HEX = "0123456789abcdef"
_PREFERRED_INTERFACES = ("br-lan", "eth0")
_LOOPBACK_TYPE = "772"  # ARPHRD_LOOPBACK in /sys/class/net/<if>/type


def validate_router_id(value, source=None):
    """Return `value` if it is a valid explicit router id; raise ConfigError otherwise."""
    if not value or len(value) > MAX_LENGTH:
        raise invalid_setting("router_id", value, "must be 1 to %d characters long" % MAX_LENGTH,
                              source)
    for char in value:
        if char not in _ID_CHARS:
            raise invalid_setting("router_id", value, "character '%s' not allowed (use letters, "
                                  "digits, '_', '.' and '-')" % char, source)
    return value


def normalise_mac(text):
    """Return MAC `text` as 12 lowercase hex digits, or None when it is not a MAC."""
    if not isinstance(text, str):
        return None
    digits = text.strip().lower().replace(":", "").replace("-", "")
    if len(digits) != 12:
        return None
    for char in digits:
        if char not in _HEX:
            return None
    return digits


def is_usable_mac(mac, require_global):
    """Return whether normalised `mac` is unicast, non-zero and, if required, global."""
    if mac == "000000000000":
        return False
    first_octet = int(mac[:2], 16)
    if first_octet & 0x01:
        return False
    if require_global and first_octet & 0x02:
        return False
    return True


def _board_macs(root):
    """Return [(mac text, description)] from /etc/board.json, best first."""
    text = read_text(system_path(root, BOARD_JSON))
    if text is None:
        return []
    try:
        board = jsoncodec.loads(text)
    except ValueError as error:
        log.warning("%s is not valid JSON (%s), its MACs are not used", BOARD_JSON, error)
        return []
    if not isinstance(board, dict):
        return []

    candidates = []
    system = board.get("system")
    if isinstance(system, dict):
        candidates.append((system.get("label_macaddr"), "label MAC in " + BOARD_JSON))
    network = board.get("network")
    lan = network.get("lan") if isinstance(network, dict) else None
    if isinstance(lan, dict):
        candidates.append((lan.get("macaddr"), "LAN MAC in " + BOARD_JSON))
    return candidates


def _list_directory(path):
    try:
        return os.listdir(path)
    except AttributeError:
        # MicroPython ports without listdir have ilistdir, yielding (name, ...) tuples.
        return [entry[0] for entry in os.ilistdir(path)]
    except OSError:
        return []


def _interface_mac(net_dir, name):
    type_text = read_text(path_join(net_dir, name, "type"))
    if name == "lo" or (type_text is not None and type_text.strip() == _LOOPBACK_TYPE):
        return None
    return normalise_mac(read_text(path_join(net_dir, name, "address")))


def _interface_macs(root):
    """Return [(mac, description)] from /sys/class/net in preference order."""
    net_dir = system_path(root, SYS_CLASS_NET)
    names = sorted(_list_directory(net_dir))
    ordered = []
    for name in _PREFERRED_INTERFACES:
        if name in names:
            ordered.append((name, "%s MAC in %s" % (name, SYS_CLASS_NET)))
    for name in names:
        if name not in _PREFERRED_INTERFACES:
            ordered.append((name, "%s MAC in %s, the first global one" % (name, SYS_CLASS_NET)))
    return [(_interface_mac(net_dir, name), description) for name, description in ordered]


def derive_router_id(root="/"):
    """Return (router id, description of its source) derived from a MAC under `root`.

    Raises ConfigError when no usable MAC is found.
    """
    for text, description in _board_macs(root):
        mac = normalise_mac(text)
        if mac is not None and is_usable_mac(mac, require_global=False):
            return mac, description
        if text is not None:
            log.warning("%s '%s' is not a usable MAC, skipped", description, text)

    for mac, description in _interface_macs(root):
        if mac is not None and is_usable_mac(mac, require_global=True):
            return mac, description

    raise missing_setting("router_id", "no usable MAC address found in %s or %s to derive "
                                       "it from" % (BOARD_JSON, SYS_CLASS_NET))
