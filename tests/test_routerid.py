"""Router id: validation of explicit ids and derivation from MAC addresses."""

import json
import os

from spotfi_agent.config import ConfigError
from spotfi_agent.routerid import derive_router_id, is_usable_mac, normalise_mac, \
    validate_router_id

LABEL_MAC = "A0:B1:C2:D3:E4:F5"
LAN_MAC = "00:11:22:33:44:55"
BRLAN_MAC = "00:11:22:33:44:66"
ETH0_MAC = "00:11:22:33:44:77"
OTHER_MAC = "00:11:22:33:44:88"


def config_error_of(function, *args):
    try:
        function(*args)
    except ConfigError as error:
        return error
    raise AssertionError("no ConfigError raised for %r" % (args,))


def write(root, relative, text):
    path = str(root) + "/" + relative
    os.makedirs(path[:path.rfind("/")], exist_ok=True)
    with open(path, "w") as handle:
        handle.write(text)


def add_interface(root, name, mac, interface_type="1"):
    write(root, "sys/class/net/%s/address" % name, mac + "\n")
    write(root, "sys/class/net/%s/type" % name, interface_type + "\n")


def write_board(root, label=None, lan=None):
    board = {"model": {"id": "test", "name": "Test board"}}
    if label is not None:
        board["system"] = {"label_macaddr": label}
    if lan is not None:
        board["network"] = {"lan": {"device": "br-lan", "macaddr": lan}}
    write(root, "etc/board.json", json.dumps(board))


def full_root(tmp_path):
    write_board(tmp_path, label=LABEL_MAC, lan=LAN_MAC)
    add_interface(tmp_path, "lo", "00:00:00:00:00:00", "772")
    add_interface(tmp_path, "br-lan", BRLAN_MAC)
    add_interface(tmp_path, "eth0", ETH0_MAC)
    add_interface(tmp_path, "eth1", OTHER_MAC)
    return str(tmp_path)


def test_derive_label_mac_first(tmp_path):
    root = full_root(tmp_path)
    assert derive_router_id(root) == ("a0b1c2d3e4f5", "label MAC in /etc/board.json")


def test_derive_board_lan_mac_second(tmp_path):
    root = full_root(tmp_path)
    write_board(tmp_path, lan=LAN_MAC)
    assert derive_router_id(root) == ("001122334455", "LAN MAC in /etc/board.json")


def test_derive_br_lan_third(tmp_path):
    root = full_root(tmp_path)
    os.remove(root + "/etc/board.json")
    assert derive_router_id(root) == ("001122334466", "br-lan MAC in /sys/class/net")


def test_derive_eth0_fourth(tmp_path):
    root = full_root(tmp_path)
    os.remove(root + "/etc/board.json")
    add_interface(tmp_path, "br-lan", "02:11:22:33:44:66")
    assert derive_router_id(root) == ("001122334477", "eth0 MAC in /sys/class/net")


def test_derive_first_global_interface_last(tmp_path):
    add_interface(tmp_path, "wlan0", "00:aa:bb:cc:dd:02")
    add_interface(tmp_path, "eth5", "00:aa:bb:cc:dd:01")
    router_id, source = derive_router_id(str(tmp_path))
    assert router_id == "00aabbccdd01"
    assert source.startswith("eth5 MAC")


def test_derive_skips_unusable_interface_macs(tmp_path):
    add_interface(tmp_path, "a-local", "02:aa:bb:cc:dd:01")
    add_interface(tmp_path, "b-multicast", "01:00:5e:00:00:01")
    add_interface(tmp_path, "c-zero", "00:00:00:00:00:00")
    add_interface(tmp_path, "d-garbage", "not a mac")
    add_interface(tmp_path, "e-broadcast", "ff:ff:ff:ff:ff:ff")
    add_interface(tmp_path, "f-good", "00:aa:bb:cc:dd:06")
    assert derive_router_id(str(tmp_path))[0] == "00aabbccdd06"


def test_derive_skips_local_br_lan_and_eth0(tmp_path):
    add_interface(tmp_path, "br-lan", "06:aa:bb:cc:dd:01")
    add_interface(tmp_path, "eth0", "0a:aa:bb:cc:dd:02")
    add_interface(tmp_path, "wan", "00:aa:bb:cc:dd:03")
    assert derive_router_id(str(tmp_path))[0] == "00aabbccdd03"


def test_derive_skips_loopback(tmp_path):
    # A global MAC on a loopback interface must still not be used.
    add_interface(tmp_path, "a-loop", "00:aa:bb:cc:dd:01", "772")
    add_interface(tmp_path, "lo", "00:aa:bb:cc:dd:02")
    add_interface(tmp_path, "z-real", "00:aa:bb:cc:dd:03")
    assert derive_router_id(str(tmp_path))[0] == "00aabbccdd03"


def test_derive_board_skips_unusable_macs(tmp_path):
    write_board(tmp_path, label="00:00:00:00:00:00", lan="01:11:22:33:44:55")
    add_interface(tmp_path, "eth0", ETH0_MAC)
    assert derive_router_id(str(tmp_path))[0] == "001122334477"


def test_derive_board_accepts_local_mac(tmp_path):
    # OpenWrt derives some board LAN MACs from a factory MAC by setting the local bit.
    write_board(tmp_path, lan="02:11:22:33:44:55")
    add_interface(tmp_path, "eth0", ETH0_MAC)
    assert derive_router_id(str(tmp_path)) == ("021122334455", "LAN MAC in /etc/board.json")


def test_derive_invalid_board_json_falls_through(tmp_path):
    write(tmp_path, "etc/board.json", "{not json")
    add_interface(tmp_path, "eth0", ETH0_MAC)
    assert derive_router_id(str(tmp_path))[0] == "001122334477"


def test_derive_board_json_wrong_shapes(tmp_path):
    write(tmp_path, "etc/board.json", json.dumps({"system": "x", "network": {"lan": 5}}))
    add_interface(tmp_path, "eth0", ETH0_MAC)
    assert derive_router_id(str(tmp_path))[0] == "001122334477"


def test_derive_no_mac_is_config_error(tmp_path):
    add_interface(tmp_path, "lo", "00:00:00:00:00:00", "772")
    add_interface(tmp_path, "eth0", "02:00:00:00:00:01")
    error = config_error_of(derive_router_id, str(tmp_path))
    assert error.setting == "router_id"
    assert str(error).startswith("missing router_id: no usable MAC")
    assert "SPOTFI_ROUTER_ID" in str(error)


def test_derive_empty_root_is_config_error(tmp_path):
    error = config_error_of(derive_router_id, str(tmp_path))
    assert error.setting == "router_id"


def test_normalise_mac_forms():
    assert normalise_mac("A0:B1:C2:D3:E4:F5") == "a0b1c2d3e4f5"
    assert normalise_mac("a0-b1-c2-d3-e4-f5") == "a0b1c2d3e4f5"
    assert normalise_mac("a0b1c2d3e4f5\n") == "a0b1c2d3e4f5"
    assert normalise_mac("a0:b1:c2:d3:e4") is None
    assert normalise_mac("g0:b1:c2:d3:e4:f5") is None
    assert normalise_mac("") is None
    assert normalise_mac(None) is None
    assert normalise_mac(12) is None


def test_is_usable_mac_bits():
    assert is_usable_mac("001122334455", require_global=True)
    assert not is_usable_mac("000000000000", require_global=False)
    assert not is_usable_mac("011122334455", require_global=False)
    assert not is_usable_mac("021122334455", require_global=True)
    assert is_usable_mac("021122334455", require_global=False)


def test_validate_router_id_accepts():
    for value in ("a0b1c2d3e4f5", "router-1", "Site_A.router-2", "x", "a" * 64):
        assert validate_router_id(value) == value


def test_validate_router_id_rejects():
    for value in ("", "a" * 65, "a/b", "a+b", "a#", "with space", "tab\t", "é"):
        error = config_error_of(validate_router_id, value)
        assert error.setting == "router_id", value
        assert str(error).startswith("invalid router_id "), value
        assert "SPOTFI_ROUTER_ID" in str(error), value
