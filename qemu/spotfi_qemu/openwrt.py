"""Boot a real OpenWrt x86-64 image in QEMU and drive it through its serial console.

    with OpenWrtGuest(workdir, broker_port, "openwrt-x86-64-generic-ext4-combined.img.gz",
                      transfer_dir="/tmp/ipks") as guest:
        status, output = guest.run("opkg install /mnt/transfer/*.ipk")

It offers the part of Guest's API (guest.py) that the end-to-end tests use:
start, run, execute, put_file, set_link, kill, reboot and close. OpenWrt has
no control agent of ours, so commands go through the root shell that
OpenWrt's `askfirst` console starts on ttyS0 (login.sh runs `login -f root`
while system.@system[0].ttylogin is unset). Files of any size come in on a
second disk built from `transfer_dir`, which the guest mounts read-only at
TRANSFER_MOUNT; put_file() writes small files through the console.

Hardware is what OpenWrt's x86-64 kernel drives without extra packages: IDE
disks (ata_piix and sd are built in) and e1000 NICs (kmod-e1000 is in the
target's default packages). The first NIC becomes `lan` (192.168.1.1, on a
QEMU network that reaches nothing) and the second `wan`. The wan gets its
DHCP lease from QEMU's user network, where 10.0.2.100:1883 is forwarded to
the host broker with one `busybox nc` per connection, as in guest.py.

NOTE: this path is not exercised in CI here: no OpenWrt image is reachable
from the machine that runs the suite, so it was written from OpenWrt's
sources (inittab, login.sh, board.d, the x86 kernel config) and never booted.
"""

import logging
import os
import re
import shutil
import socket
import subprocess
import time
import uuid
import zlib

from spotfi_qemu import image as image_builder
from spotfi_qemu.errors import GuestBootError, GuestError, GuestTimeoutError
from spotfi_qemu.guest import CommandResult, find_qemu, kvm_usable
from spotfi_qemu.machine import (CREATED, RUNNING, STOPPED, QemuMachine, connect_unix_socket,
                                 kill_qemu, user_netdev)

log = logging.getLogger(__name__)

LAN_NIC_ID = "lan"
WAN_NIC_ID = "wan"
TRANSFER_MOUNT = "/mnt/transfer"
# procd prints this for each `askfirst` console of /etc/inittab.
ACTIVATE_PROMPT = b"Please press Enter to activate this console."
DEFAULT_BOOT_TIMEOUT = 300.0
NETWORK_TIMEOUT = 90.0
# The console's line discipline takes at most 4095 characters per line;
# each put_file() line carries this many bytes as 4-character octal escapes.
PUT_CHUNK_BYTES = 700
REPLY_MARGIN = 20.0


class OpenWrtGuest(QemuMachine):
    """One OpenWrt x86-64 VM on a copy of a combined image, controlled through ttyS0.

    `image_path` is an OpenWrt x86-64 combined image (.img or .img.gz,
    ext4 or squashfs); it is copied into `workdir` on the first start and
    never changed. `transfer_dir`, when given, becomes the second disk.
    set_link() switches the wan NIC.
    """

    LINK_NIC_ID = WAN_NIC_ID
    SOCKET_DIR_PREFIX = "spotfi-openwrt-"

    def __init__(self, workdir, broker_port, image_path, transfer_dir=None, memory="256M",
                 boot_timeout=DEFAULT_BOOT_TIMEOUT):
        super().__init__(workdir, broker_port, memory, boot_timeout)
        self.image_path = image_path
        self.transfer_dir = transfer_dir
        self._console = None
        self.disk = os.path.join(self.workdir, "openwrt.img")
        self.transfer_disk = os.path.join(self.workdir, "transfer.img")

    # Lifecycle

    def start(self, timeout=None):
        """Boot QEMU, open the console's root shell and wait for the wan interface; return self."""
        self._require(CREATED, STOPPED, action="start()")
        started = time.monotonic()
        deadline = started + (self.boot_timeout if timeout is None else timeout)
        self._prepare_disks()
        self._launch()
        try:
            self._open_shell(deadline)
            self._wait_for_wan(deadline)
            self._mount_transfer_disk()
        except GuestError as error:
            detail = self._failure_detail()
            self._stop_process()
            raise GuestBootError("OpenWrt did not become ready: %s%s" % (error, detail)) from None
        self._state = RUNNING
        self.boot_seconds = time.monotonic() - started
        return self

    def reboot(self, timeout=None):
        """Reboot through OpenWrt's `reboot` and wait until the new boot's shell and wan are up."""
        self._require(RUNNING, action="reboot()")
        started = time.monotonic()
        deadline = started + (self.boot_timeout if timeout is None else timeout)
        old_boot_id = self.boot_id
        # QEMU runs without -no-reboot here, so the VM resets in place.
        self._console.send(b"reboot\n")
        try:
            self._open_shell(deadline)
            self._wait_for_wan(deadline)
            self._mount_transfer_disk()
        except GuestError as error:
            raise GuestBootError("OpenWrt did not come back after reboot: %s%s"
                                 % (error, self._failure_detail())) from None
        if self.boot_id == old_boot_id:
            raise GuestBootError("the boot id %s did not change across reboot()" % old_boot_id)
        self.boot_seconds = time.monotonic() - started

    # Guest access

    def execute(self, cmd, timeout=30.0):
        """Run `cmd` in a subshell of the console's root shell and return a CommandResult.

        Raises GuestTimeoutError, after interrupting it with ^C, when it runs
        past `timeout` seconds.
        """
        self._require(RUNNING, action="execute()")
        _check_console_text(cmd)
        nonce = uuid.uuid4().hex[:12]
        # The markers are split by empty quotes, so a line echoed back by the
        # terminal never contains them whole.
        line = ("( %s ) </dev/null >/tmp/.console.out 2>/tmp/.console.err; "
                "echo \"%s-\"\"status $?\"; cat /tmp/.console.out; printf '\\n%s-''stdout\\n'; "
                "cat /tmp/.console.err; printf '\\n%s-''stderr\\n'\n" % (cmd, nonce, nonce, nonce))
        self._console.send(line.encode("utf-8"))
        try:
            output = self._console.read_until(("%s-stderr\n" % nonce).encode(),
                                              time.monotonic() + timeout)
        except GuestTimeoutError:
            self._console.send(b"\x03")
            self._sync(time.monotonic() + REPLY_MARGIN)
            raise GuestTimeoutError("guest command %r ran past %.1f s and was interrupted"
                                    % (cmd, timeout)) from None
        text = output.decode("utf-8", "replace")
        match = re.search(r"%s-status (\d+)\n(.*)\n%s-stdout\n(.*)\n%s-stderr\n$"
                          % (nonce, nonce, nonce), text, re.DOTALL)
        if match is None:
            raise GuestError("cannot parse the console output of %r: %r" % (cmd, text[-500:]))
        return CommandResult(int(match.group(1)), match.group(2), match.group(3))

    def put_file(self, local_path, guest_path, mode=None):
        """Write a host file to `guest_path` through the console (slow: for files of a few KB)."""
        if mode is None:
            mode = os.stat(local_path).st_mode & 0o7777
        with open(local_path, "rb") as handle:
            data = handle.read()
        temporary = "%s.part" % guest_path
        self._checked("mkdir -p %s && : > %s" % (_quote(os.path.dirname(guest_path) or "/"),
                                                _quote(temporary)))
        for offset in range(0, len(data), PUT_CHUNK_BYTES):
            escaped = "".join("\\%03o" % byte for byte in data[offset:offset + PUT_CHUNK_BYTES])
            self._checked("printf '%s' >> %s" % (escaped, _quote(temporary)))
        self._checked("chmod %o %s && mv %s %s" % (mode, _quote(temporary), _quote(temporary),
                                                   _quote(guest_path)))

    # Internals

    def _checked(self, cmd):
        result = self.execute(cmd)
        if result.status != 0:
            raise GuestError("guest command %r failed with status %d: %s"
                             % (cmd[:200], result.status, result.stderr.strip()[-500:]))
        return result

    def _prepare_disks(self):
        if not os.path.exists(self.disk):
            _copy_image(self.image_path, self.disk)
        if self.transfer_dir is not None:
            _make_transfer_disk(self.transfer_dir, self.transfer_disk)

    def _qemu_argv(self):
        stand_in = image_builder.build_image()
        self.accelerator = "kvm" if kvm_usable(stand_in.kernel) else "tcg"
        wan = user_netdev("wan0", self._write_broker_forwarder(stand_in.busybox))
        argv = [
            find_qemu(), "-accel", self.accelerator, "-m", self.memory, "-smp", "1",
            "-nodefaults", "-no-user-config", "-display", "none",
            "-drive", "file=%s,format=raw,if=ide,index=0" % self.disk,
            "-netdev", "user,id=lan0,restrict=on,net=192.168.77.0/24",
            "-device", "e1000,netdev=lan0,id=%s,mac=52:54:00:12:35:01" % LAN_NIC_ID,
            "-netdev", wan,
            "-device", "e1000,netdev=wan0,id=%s,mac=52:54:00:12:35:02" % WAN_NIC_ID,
            "-chardev", "socket,id=console,path=%s,server=on,wait=off,logfile=%s,logappend=on"
            % (self._socket_path("console.sock"), self.console_log),
            "-serial", "chardev:console",
            "-qmp", "unix:%s,server=on,wait=off" % self._socket_path("qmp.sock"),
        ]
        if self.transfer_dir is not None:
            argv += ["-drive", "file=%s,format=raw,if=ide,index=1" % self.transfer_disk]
        return argv

    def _launch(self):
        self._process = self._popen_qemu(self._qemu_argv(), ("console.sock", "qmp.sock"))
        log.info("started OpenWrt QEMU with PID %d (%s)", self._process.pid, self.accelerator)
        self._console = SerialConsole(self._socket_path("console.sock"), self._process)

    def _open_shell(self, deadline):
        """Activate the askfirst console, make the shell quiet and record the boot id."""
        self._console.read_until(ACTIVATE_PROMPT, deadline)
        self._console.send(b"\n")
        # No echo, no prompts, no \r added to output, no kernel messages on
        # the console: the output between two markers is exactly the command's.
        self._console.send(b"stty -echo -opost; PS1=''; PS2=''; dmesg -n 1\n")
        self._sync(deadline)
        self._state = RUNNING
        status, output = self.run("cat /proc/sys/kernel/random/boot_id")
        if status != 0:
            raise GuestError("cannot read the boot id: status %d" % status)
        self.boot_id = output.strip()

    def _sync(self, deadline):
        nonce = uuid.uuid4().hex[:12]
        self._console.send(("echo \"%s-\"\"sync\"\n" % nonce).encode())
        self._console.read_until(("%s-sync\n" % nonce).encode(), deadline)

    def _wait_for_wan(self, deadline):
        deadline = min(deadline, time.monotonic() + NETWORK_TIMEOUT)
        while True:
            status, output = self.run("ubus call network.interface.wan status")
            if status == 0 and re.search(r'"up":\s*true', output):
                return
            if time.monotonic() > deadline:
                raise GuestTimeoutError("interface wan did not come up: %s" % output[-300:])
            time.sleep(1.0)

    def _mount_transfer_disk(self):
        # The transfer disk is the second IDE disk, after OpenWrt's own.
        if self.transfer_dir is not None:
            self._checked("mkdir -p %s && mount -o ro /dev/sdb %s" % (TRANSFER_MOUNT, TRANSFER_MOUNT))

    def _stop_process(self):
        process = self._process
        self._process = None
        if self._console is not None:
            self._console.close()
            self._console = None
        if process is not None:
            kill_qemu(process, grace=0.0)
        if self._state == RUNNING:
            self._state = STOPPED


class SerialConsole:
    """ttyS0 of the guest through QEMU's unix socket chardev."""

    def __init__(self, path, process, connect_timeout=10.0):
        self._buffer = b""
        self._process = process
        self._socket = connect_unix_socket(path, "the serial console", connect_timeout,
                                           is_alive=lambda: process.poll() is None)

    def send(self, data):
        self._socket.sendall(data)

    def read_until(self, marker, deadline):
        """Return the output up to and including `marker`; keep what follows for the next read."""
        while marker not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise GuestTimeoutError("no %r on the serial console in time" % marker)
            if self._process.poll() is not None:
                raise GuestError("QEMU exited with status %s" % self._process.returncode)
            self._socket.settimeout(min(remaining, 1.0))
            try:
                chunk = self._socket.recv(65536)
            except socket.timeout:
                continue
            if not chunk:
                raise GuestError("QEMU closed the serial console")
            # The console is a terminal: drop the \r the guest adds before -opost is set.
            self._buffer += chunk.replace(b"\r", b"")
        end = self._buffer.index(marker) + len(marker)
        output, self._buffer = self._buffer[:end], self._buffer[end:]
        return output

    def close(self):
        self._socket.close()


def _check_console_text(cmd):
    """Raise GuestError for a command the console's line discipline would change or cut."""
    if len(cmd) > 3500:
        raise GuestError("a console command has at most 3500 characters, this one %d; "
                         "put long content on the transfer disk" % len(cmd))
    for character in cmd:
        if (ord(character) < 0x20 and character != "\t") or character == "\x7f":
            raise GuestError("console command %r contains the control character %r, which the "
                             "terminal would interpret" % (cmd[:80], character))


def _quote(value):
    return "'" + value.replace("'", "'\\''") + "'"


def _copy_image(source, target):
    """Copy an OpenWrt combined image, gunzipping a .gz one.

    OpenWrt's .img.gz files carry a signature after the gzip stream, which
    `gzip -d` reports as trailing garbage; only the first stream is read here.
    """
    if not os.path.isfile(source):
        raise GuestError("OpenWrt image %s is not a file; set OPENWRT_IMAGE to an x86-64 "
                         "combined image (.img or .img.gz)" % source)
    with open(source, "rb") as reader, open(target + ".part", "wb") as writer:
        if source.endswith(".gz"):
            decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
            while not decompressor.eof:
                chunk = reader.read(1 << 20)
                if not chunk:
                    raise GuestError("%s ends inside its gzip stream" % source)
                writer.write(decompressor.decompress(chunk))
        else:
            shutil.copyfileobj(reader, writer, 1 << 20)
    os.replace(target + ".part", target)


def _make_transfer_disk(directory, target):
    """Write an ext2 image of `directory` (ext4's driver mounts ext2 on OpenWrt's kernel)."""
    total = 0
    for folder, _, files in os.walk(directory):
        for name in files:
            total += os.path.getsize(os.path.join(folder, name))
    size_kib = max(16 * 1024, int(total * 1.3 / 1024) + 8 * 1024)
    mke2fs = shutil.which("mke2fs") or "/sbin/mke2fs"
    if os.path.exists(target):
        os.remove(target)
    result = subprocess.run([mke2fs, "-q", "-t", "ext2", "-L", "transfer", "-d", directory,
                             target, "%dk" % size_kib], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise GuestError("mke2fs could not build the transfer disk from %s: %s"
                         % (directory, result.stdout.decode("utf-8", "replace").strip()))
