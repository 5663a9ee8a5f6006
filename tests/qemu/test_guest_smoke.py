"""Smoke tests of the QEMU stand-in router: boot, commands, PTYs, broker access, link, packages.

One guest boots per module; the reboot and kill tests boot it again, so
the whole module takes about four boots.
"""

import hashlib
import io
import os
import socket
import tarfile
import time
import uuid

import pytest

import localservices
from spotfi_qemu import GUEST_BROKER_HOST, Guest, GuestTimeoutError

pytestmark = pytest.mark.qemu

# Runs in the guest: MQTT 3.1.1 CONNECT, print the CONNACK in hex, then keep
# the connection open for argv[3] seconds.
MQTT_PROBE = b"""\
import socket, struct, sys, time

host, client_id = sys.argv[1], sys.argv[2].encode()
hold = float(sys.argv[3]) if len(sys.argv) > 3 else 0
body = b"\\x00\\x04MQTT\\x04\\x02" + struct.pack(">H", 600)
body += struct.pack(">H", len(client_id)) + client_id
connection = socket.create_connection((host, 1883), timeout=5)
connection.sendall(bytes([0x10, len(body)]) + body)
connack = b""
while len(connack) < 4:
    chunk = connection.recv(4 - len(connack))
    if not chunk:
        break
    connack += chunk
print("connack", connack.hex(), flush=True)
time.sleep(hold)
"""

GUEST_SERVICE_PORT = 8080

PYTHON_IMPORTS = ("json ssl socket select signal subprocess base64 pty tty termios fcntl struct "
                  "random errno time os heapq binascii tarfile gzip shlex hashlib hmac logging "
                  "encodings.idna ptyprocess").split()


@pytest.fixture(scope="module")
def forwarded_port():
    """Host port on 127.0.0.1 that QEMU forwards to the guest's GUEST_SERVICE_PORT."""
    return localservices.free_port()


@pytest.fixture(scope="module")
def guest(qemu_image, mosquitto, forwarded_port, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("guest")
    with Guest(str(workdir), broker_port=mosquitto.port, image=qemu_image,
               hostfwd=[(forwarded_port, GUEST_SERVICE_PORT)]) as running:
        probe = workdir / "mqtt_probe.py"
        probe.write_bytes(MQTT_PROBE)
        running.put_file(str(probe), "/root/mqtt_probe.py")
        yield running


def wait_for_broker_log(service, text, count=1, timeout=30.0):
    """Wait until mosquitto's log contains `text` at least `count` times; fail with its tail if not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(service.log_path, encoding="utf-8", errors="replace") as handle:
            if handle.read().count(text) >= count:
                return
        time.sleep(0.1)
    pytest.fail("mosquitto's log did not show %r %d times within %.0f s; its end:\n%s"
                % (text, count, timeout, service.log_tail()))


def unique_client_id(prefix):
    return "%s-%s" % (prefix, uuid.uuid4().hex[:8])


def targz(entries):
    """Return a tar.gz of (name, data, mode) entries; data None makes a directory."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", format=tarfile.GNU_FORMAT) as archive:
        for name, data, mode in entries:
            info = tarfile.TarInfo(name)
            info.mode = mode
            info.mtime = int(time.time())
            if data is None:
                info.type = tarfile.DIRTYPE
                archive.addfile(info)
            else:
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def build_ipk(path, control, scripts, data_entries, conffiles=()):
    """Write an ipk as OpenWrt's ipkg-build does: a tar.gz of debian-binary, control.tar.gz, data.tar.gz."""
    control_entries = [("./", None, 0o755), ("./control", control.encode(), 0o644)]
    for name, text in scripts.items():
        control_entries.append(("./" + name, text.encode(), 0o755))
    if conffiles:
        control_entries.append(("./conffiles", "".join(c + "\n" for c in conffiles).encode(), 0o644))
    outer = targz([
        ("./debian-binary", b"2.0\n", 0o644),
        ("./data.tar.gz", targz(data_entries), 0o644),
        ("./control.tar.gz", targz(control_entries), 0o644),
    ])
    path.write_bytes(outer)
    return str(path)


def test_guest_boot_uname(guest):
    status, output = guest.run("uname -a")

    assert status == 0
    assert output.startswith("Linux spotfi-qemu ")
    assert "x86_64" in output


def test_guest_python_imports(guest):
    status, output = guest.run("python3 -c 'import json, ssl, socket, select, pty; print(1)'")
    assert (status, output) == (0, "1\n")

    result = guest.execute("python3 -c 'import %s; print(\"all\")'" % ", ".join(PYTHON_IMPORTS))
    assert result.stderr == ""
    assert result.stdout == "all\n"


def test_guest_pty_fork(guest):
    script = ("import pty, os; pid, fd = pty.fork()\n"
              "if pid == 0: os.execv('/bin/sh', ['sh', '-c', 'echo pty-ok; tty'])\n"
              "output = b''\n"
              "while True:\n"
              "    try: chunk = os.read(fd, 1024)\n"
              "    except OSError: break\n"
              "    if not chunk: break\n"
              "    output += chunk\n"
              "os.waitpid(pid, 0); print(output.decode().replace('\\r', ''))")
    with_quotes = script.replace("'", "'\"'\"'")

    status, output = guest.run("python3 -c '%s'" % with_quotes)

    assert status == 0
    assert "pty-ok" in output
    assert "/dev/pts/" in output


def test_guest_put_file_binary(guest, tmp_path):
    payload = os.urandom(150 * 1024)
    local = tmp_path / "payload.bin"
    local.write_bytes(payload)

    guest.put_file(str(local), "/tmp/upload/payload.bin", mode=0o600)

    status, output = guest.run("md5sum /tmp/upload/payload.bin; stat -c %a /tmp/upload/payload.bin")
    assert status == 0
    assert output.split() == [hashlib.md5(payload).hexdigest(), "/tmp/upload/payload.bin", "600"]


def test_guest_command_timeout(guest):
    with pytest.raises(GuestTimeoutError):
        guest.run("sleep 30", timeout=1)

    assert guest.run("echo still-answering") == (0, "still-answering\n")


def test_guest_broker_through_guestfwd(guest, mosquitto):
    by_address = unique_client_id("qemu-address")
    by_name = unique_client_id("qemu-name")

    first = guest.run("python3 /root/mqtt_probe.py %s %s" % (GUEST_BROKER_HOST, by_address))
    # A host name makes CPython encode it with encodings.idna before resolving.
    second = guest.run("python3 /root/mqtt_probe.py broker.spotfi.test %s" % by_name)

    assert first == (0, "connack 20020000\n")
    assert second == (0, "connack 20020000\n")
    wait_for_broker_log(mosquitto, "as %s (" % by_address)
    wait_for_broker_log(mosquitto, "as %s (" % by_name)


def test_guest_hostfwd_reaches_guest_port(guest, forwarded_port):
    guest.run("setsid nc -l -p %d -e echo from-guest > /dev/null 2>&1 &" % GUEST_SERVICE_PORT)

    received = b""
    deadline = time.monotonic() + 20
    while b"from-guest" not in received and time.monotonic() < deadline:
        # QEMU accepts on the host port before the guest listens; retry until the reply comes.
        try:
            with socket.create_connection(("127.0.0.1", forwarded_port), timeout=5) as connection:
                received = connection.recv(100)
        except OSError:
            pass
        if b"from-guest" not in received:
            time.sleep(0.2)

    assert received == b"from-guest\n"


def test_guest_set_link_down_and_up(guest):
    connect = ("python3 -c 'import socket; socket.create_connection((\"%s\", 1883), timeout=3)'"
               % GUEST_BROKER_HOST)
    guest.set_link(False)
    try:
        carrier_down = guest.run("cat /sys/class/net/eth0/carrier")
        status_down, _ = guest.run(connect)
    finally:
        guest.set_link(True)
    carrier_up = guest.run("cat /sys/class/net/eth0/carrier")
    status_up, _ = guest.run(connect)

    assert carrier_down == (0, "0\n")
    assert status_down != 0
    assert carrier_up == (0, "1\n")
    assert status_up == 0


def test_guest_ipk_install_upgrade_remove(guest, tmp_path):
    log_line = ('#!/bin/sh\necho "%s $* PKG_ROOT=$PKG_ROOT PKG_UPGRADE=$PKG_UPGRADE '
                'IPKG_INSTROOT=${IPKG_INSTROOT-unset}" >> /tmp/hello-standin.log\n')
    scripts = {name: log_line % name for name in ("preinst", "postinst", "prerm", "postrm")}

    def package(version):
        control = ("Package: hello-standin\nVersion: %s\nArchitecture: all\n"
                   "Depends: python3-light, libnot-in-image\nDescription: smoke test\n" % version)
        data = [
            ("./", None, 0o755), ("./usr/", None, 0o755), ("./usr/bin/", None, 0o755),
            ("./usr/bin/hello-standin", b"#!/bin/sh\necho hello %s\n" % version.encode(), 0o755),
            ("./etc/", None, 0o755), ("./etc/config/", None, 0o755),
            ("./etc/config/hello-standin", b"option version '%s'\n" % version.encode(), 0o644),
        ]
        path = build_ipk(tmp_path / ("hello-standin_%s_all.ipk" % version), control, scripts,
                         data, conffiles=["/etc/config/hello-standin"])
        guest.put_file(path, "/tmp/hello-standin_%s_all.ipk" % version)
        return "/tmp/hello-standin_%s_all.ipk" % version

    first = guest.execute("ipk-install %s" % package("1.0"))
    assert first.status == 0, first
    assert "libnot-in-image" in first.stderr
    assert guest.run("hello-standin") == (0, "hello 1.0\n")
    assert guest.run("cat /usr/lib/opkg/info/hello-standin.list")[1].split() == [
        "/usr/bin/hello-standin", "/etc/config/hello-standin"]

    guest.run("echo \"option mine 'yes'\" >> /etc/config/hello-standin")
    second = guest.execute("ipk-install %s" % package("2.0"))
    assert second.status == 0, second
    assert guest.run("hello-standin") == (0, "hello 2.0\n")
    assert "option mine 'yes'" in guest.run("cat /etc/config/hello-standin")[1]
    assert guest.run("cat /etc/config/hello-standin-opkg") == (0, "option version '2.0'\n")

    removed = guest.execute("ipk-install --remove hello-standin")
    assert removed.status == 0, removed
    assert guest.run("test -e /usr/bin/hello-standin")[0] == 1
    assert guest.run("test -e /etc/config/hello-standin")[0] == 0
    assert "hello-standin" not in guest.run("cat /usr/lib/opkg/status")[1]

    assert guest.run("cat /tmp/hello-standin.log")[1].splitlines() == [
        "preinst install PKG_ROOT=/ PKG_UPGRADE=0 IPKG_INSTROOT=unset",
        "postinst configure PKG_ROOT=/ PKG_UPGRADE=0 IPKG_INSTROOT=unset",
        "prerm upgrade 2.0 PKG_ROOT=/ PKG_UPGRADE=1 IPKG_INSTROOT=unset",
        "preinst upgrade 1.0 PKG_ROOT=/ PKG_UPGRADE=1 IPKG_INSTROOT=unset",
        "postinst configure PKG_ROOT=/ PKG_UPGRADE=1 IPKG_INSTROOT=unset",
        "prerm remove PKG_ROOT=/ PKG_UPGRADE=0 IPKG_INSTROOT=unset",
        "postrm remove PKG_ROOT=/ PKG_UPGRADE=0 IPKG_INSTROOT=unset",
    ]


SERVICE_INIT = """\
#!/bin/sh /etc/rc.common
START=95
STOP=10
USE_PROCD=1

start_instance() {
\t[ "$2" = 0 ] || { echo "standin-service: invalid configuration" >&2; return 1; }
\tprocd_open_instance
\tprocd_set_param command /usr/bin/python3 /root/mqtt_probe.py 10.0.2.100 "$client_id" "$hold"
\tprocd_set_param respawn 3600 1 0
\tprocd_set_param stdout 1
\tprocd_set_param stderr 1
\tprocd_close_instance
}

start_service() {
\tuci_load_validate standin-service main main start_instance 'client_id:string' 'hold:uinteger:600'
}
"""

# The maintainer scripts OpenWrt's package.mk generates for every package.
OPENWRT_POSTINST = """\
#!/bin/sh
[ "${IPKG_NO_SCRIPT}" = "1" ] && exit 0
[ -s ${IPKG_INSTROOT}/lib/functions.sh ] || exit 0
. ${IPKG_INSTROOT}/lib/functions.sh
default_postinst $0 $@
"""
OPENWRT_PRERM = OPENWRT_POSTINST.replace("default_postinst", "default_prerm")


def test_guest_service_restarts_after_reboot(guest, mosquitto, tmp_path):
    client_id = unique_client_id("qemu-service")
    config = "config main 'main'\n\toption client_id '%s'\n" % client_id
    data = [
        ("./", None, 0o755), ("./etc/", None, 0o755), ("./etc/init.d/", None, 0o755),
        ("./etc/init.d/standin-service", SERVICE_INIT.encode(), 0o755),
        ("./etc/config/", None, 0o755),
        ("./etc/config/standin-service", config.encode(), 0o644),
    ]
    control = "Package: standin-service\nVersion: 1\nArchitecture: all\nDescription: smoke test\n"
    path = build_ipk(tmp_path / "standin-service_1_all.ipk", control,
                     {"postinst": OPENWRT_POSTINST, "prerm": OPENWRT_PRERM}, data,
                     conffiles=["/etc/config/standin-service"])
    guest.put_file(path, "/tmp/standin-service.ipk")

    installed = guest.execute("ipk-install /tmp/standin-service.ipk")
    assert installed.status == 0, installed
    connected = "as %s (" % client_id
    wait_for_broker_log(mosquitto, connected, count=1)
    assert guest.run("/etc/init.d/standin-service running")[0] == 0
    assert guest.run("test -L /etc/rc.d/S95standin-service")[0] == 0

    old_boot_id = guest.boot_id
    guest.reboot()

    assert guest.boot_id != old_boot_id
    wait_for_broker_log(mosquitto, connected, count=2)
    assert "connack 20020000" in guest.run("logread -e standin-service")[1]

    guest.execute("ipk-install --remove standin-service")


def test_guest_reboot_by_itself_relaunches(guest):
    old_boot_id = guest.boot_id
    reboots = guest.reboots

    guest.run("(sleep 1; reboot) > /dev/null 2>&1 &")
    new_boot_id = guest.wait_ready(previous_boot_id=old_boot_id)

    assert new_boot_id != old_boot_id
    assert guest.reboots == reboots + 1
    assert guest.run("cat /proc/sys/kernel/random/boot_id") == (0, new_boot_id + "\n")


def test_guest_kill_closes_broker_connection(guest, mosquitto):
    client_id = unique_client_id("qemu-kill")
    guest.run("echo kept > /etc/config/kill-check; sync")
    guest.run("setsid python3 /root/mqtt_probe.py %s %s 600 > /tmp/hold.log 2>&1 &"
              % (GUEST_BROKER_HOST, client_id))
    wait_for_broker_log(mosquitto, "as %s (" % client_id)
    first_pid = guest.pid

    guest.kill()

    # mosquitto 2.0 logs a socket closed without DISCONNECT as "closed its connection".
    wait_for_broker_log(mosquitto, "Client %s closed its connection" % client_id, timeout=10)
    assert guest.state == "stopped"

    guest.start()
    assert guest.pid != first_pid
    assert guest.run("cat /etc/config/kill-check") == (0, "kept\n")
