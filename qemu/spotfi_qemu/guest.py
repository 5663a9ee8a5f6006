"""Boot and drive the QEMU stand-in router from the host.

    with Guest(workdir, broker_port=mosquitto.port) as guest:
        status, output = guest.run("uname -a")

One Guest is one QEMU process started and stopped by its PID. Inside the
guest, the host's broker is GUEST_BROKER_HOST:GUEST_BROKER_PORT; QEMU's
user network (restrict=on) forwards each connection there to a
`busybox nc 127.0.0.1 <broker_port>` it starts, so the broker gets one TCP
connection per guest connection, closed when the guest's closes.

The guest's root is an overlayfs whose upper layer is the ext4 disk
`workdir`/overlay.img, so files written in the guest survive reboot(),
shutdown() + start() and kill() + start(), as on a router's flash. As on
flash, kill() loses writes the guest had not synced yet.
"""

import base64
import fcntl
import json
import logging
import os
import select
import shutil
import stat
import subprocess
import threading
import time

from spotfi_qemu import image as image_builder
from spotfi_qemu.control import ControlChannel
from spotfi_qemu.errors import GuestBootError, GuestError, GuestTimeoutError
from spotfi_qemu.machine import (CREATED, RUNNING, STOPPED, QemuMachine, kill_process_group,
                                 kill_qemu, user_netdev)

log = logging.getLogger(__name__)

GUEST_ADDRESS = "10.0.2.15"
NIC_ID = "nic0"

DEFAULT_BOOT_TIMEOUT = 120.0
PUT_CHUNK_BYTES = 48 * 1024
# Extra time the host waits for a reply beyond a command's own timeout: an
# emulated guest on a busy host can be slow to start the shell and reply.
REPLY_MARGIN = 20.0

KVM_PROBE_SECONDS = 5.0
_KVM_GET_API_VERSION = 0xAE00
_KVM_CREATE_VM = 0xAE01


class CommandResult:
    """Exit status and output of one guest command; output is decoded as UTF-8 with replacement."""

    def __init__(self, status, stdout, stderr):
        self.status = status
        self.stdout = stdout
        self.stderr = stderr

    def __repr__(self):
        return "CommandResult(status=%r, stdout=%r, stderr=%r)" % (
            self.status, self.stdout[-200:], self.stderr[-200:])


def kvm_usable(kernel):
    """Return True when QEMU can boot `kernel` under KVM.

    /dev/kvm can open and create VMs yet hang once the guest leaves real mode
    (seen on a nested-virtualisation host), so after the ioctl checks QEMU
    boots the kernel without an initramfs and must print its banner within
    KVM_PROBE_SECONDS. The result is kept in kvm-probe.json in the build
    directory for as long as the host's boot id and QEMU's binary stay the same.
    SPOTFI_QEMU_ACCEL=kvm or =tcg skips the checks.
    """
    forced = os.environ.get("SPOTFI_QEMU_ACCEL", "")
    if forced in ("kvm", "tcg"):
        return forced == "kvm"

    qemu = find_qemu()
    with open("/proc/sys/kernel/random/boot_id") as handle:
        key = {"host_boot_id": handle.read().strip(), "qemu": qemu,
               "qemu_mtime": os.stat(qemu).st_mtime, "kernel": kernel}
    # The image directory is replaced on each rebuild; its parent stays.
    cache = os.path.join(os.path.dirname(os.path.dirname(kernel)), "kvm-probe.json")
    try:
        with open(cache) as handle:
            cached = json.load(handle)
        if cached.get("key") == key:
            return cached["usable"]
    except (OSError, ValueError, KeyError):
        pass

    usable = _kvm_device_works() and _kvm_boots(qemu, kernel)
    log.info("KVM %s on this host; QEMU runs with -accel %s", "works" if usable else "does not work",
             "kvm" if usable else "tcg")
    try:
        with open(cache, "w") as handle:
            json.dump({"key": key, "usable": usable}, handle)
    except OSError as error:
        log.warning("cannot keep the KVM probe result in %s: %s", cache, error)
    return usable


def _kvm_device_works():
    try:
        descriptor = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if fcntl.ioctl(descriptor, _KVM_GET_API_VERSION) != 12:
            return False
        os.close(fcntl.ioctl(descriptor, _KVM_CREATE_VM, 0))
        return True
    except OSError:
        return False
    finally:
        os.close(descriptor)


def _kvm_boots(qemu, kernel):
    argv = [qemu, "-accel", "kvm", "-m", "128M", "-nodefaults", "-no-user-config",
            "-display", "none", "-no-reboot", "-kernel", _escape(kernel),
            "-append", "console=ttyS0 panic=-1", "-serial", "stdio"]
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    output = b""
    deadline = time.monotonic() + KVM_PROBE_SECONDS
    try:
        os.set_blocking(process.stdout.fileno(), False)
        while b"Linux version" not in output and time.monotonic() < deadline:
            if process.poll() is not None:
                break
            ready, _, _ = select.select([process.stdout], [], [], 0.1)
            if ready:
                output += process.stdout.read() or b""
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        process.stdout.close()
    return b"Linux version" in output


def find_qemu():
    path = shutil.which("qemu-system-x86_64")
    if path is None:
        raise GuestError("qemu-system-x86_64 is not installed; run `make qemu-image` or "
                         "`apt-get install qemu-system-x86`")
    return path


class Guest(QemuMachine):
    """One stand-in router VM: boot, run commands, copy files, cut the link, kill, reboot.

    `workdir` keeps the overlay disk, the console log (console.log, kept
    across boots), QEMU's own output (qemu.log) and the sockets. `hostfwd`
    is a list of (host_port, guest_port) pairs: host 127.0.0.1:host_port
    reaches guest port guest_port. `broker_port` is the host broker's port on
    127.0.0.1; None leaves the broker address unforwarded. `qemu_args` are
    appended to QEMU's command line.

    A reboot, whether reboot() requests it or the guest decides on its own,
    ends the QEMU process (-no-reboot), and a watcher thread starts a new one
    on the same disk. A fresh QEMU boots as fast as the first boot, while an
    in-place reset under TCG took 8 to 20 s longer on a 2-core test host.

    With the link down (set_link(False)), the guest's TCP connections stay
    open on both ends but carry nothing, as when a router's uplink cable is
    pulled. A reboot starts a new QEMU process, whose link is up again.
    """

    LINK_NIC_ID = NIC_ID
    SOCKET_DIR_PREFIX = "spotfi-qemu-"

    def __init__(self, workdir, broker_port, hostfwd=(), memory="256M", image=None,
                 boot_timeout=DEFAULT_BOOT_TIMEOUT, kernel_args="quiet", qemu_args=()):
        super().__init__(workdir, broker_port, memory, boot_timeout)
        self.hostfwd = [(int(host), int(guest)) for host, guest in hostfwd]
        self.kernel_args = kernel_args
        self.qemu_args = list(qemu_args)
        self.reboots = 0

        self._image = image
        self._argv = None

        # The control channel to the QEMU process of the current boot.
        # _process_lock guards launching and killing (the watcher thread
        # relaunches); _request_lock lets one control request run at a time.
        self._channel = None
        self._channel_process = None
        self._stopping = False
        self._console_offset = 0
        self._watcher = None
        self._process_lock = threading.Lock()
        self._request_lock = threading.RLock()

        self.overlay_disk = os.path.join(self.workdir, "overlay.img")

    # Lifecycle

    def start(self, timeout=None):
        """Boot QEMU and wait until the guest's control agent replies; return self.

        Allowed when the guest was never started or has stopped; the overlay
        disk keeps its contents between starts. Raises GuestBootError, after
        killing QEMU, when the agent does not reply within `timeout` seconds
        (default: boot_timeout).
        """
        self._require(CREATED, STOPPED, action="start()")
        timeout = self.boot_timeout if timeout is None else timeout
        image = self._image or image_builder.build_image()
        forwarder = self._prepare_workdir(image)
        self._argv = self._qemu_argv(image, forwarder)

        started = time.monotonic()
        with self._process_lock:
            self._stopping = False
            self._launch()
        self._watcher = threading.Thread(target=self._watch, name="qemu-watcher", daemon=True)
        self._watcher.start()
        try:
            with self._request_lock:
                self.boot_id = self._wait_for_agent(None, started + timeout)
        except GuestError as error:
            detail = self._failure_detail()
            self._stop_process()
            raise GuestBootError("the guest did not become ready: %s%s" % (error, detail)) from None
        self.boot_seconds = time.monotonic() - started
        self._state = RUNNING
        log.info("guest PID %d ready after %.1f s, boot id %s", self.pid, self.boot_seconds,
                 self.boot_id)
        return self

    def wait_ready(self, timeout=None, previous_boot_id=None):
        """Wait until a control agent replies and return its boot id.

        For a reboot the guest starts on its own, for example through the
        agent under test: with `previous_boot_id` set, only an agent of
        another boot counts, so the call also waits out the old boot.
        """
        self._require(RUNNING, action="wait_ready()")
        timeout = self.boot_timeout if timeout is None else timeout
        with self._request_lock:
            self.boot_id = self._wait_for_agent(previous_boot_id, time.monotonic() + timeout)
        return self.boot_id

    def shutdown(self, timeout=60.0):
        """Power the guest off through busybox init (init scripts stopped, disk synced)."""
        self._require(RUNNING, action="shutdown()")
        self._stopping = True
        process = self._process
        with self._request_lock:
            self._current_channel().request("poweroff", REPLY_MARGIN)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("guest PID %d did not power off within %.0f s; killing it",
                        process.pid, timeout)
        self._stop_process()

    def reboot(self, timeout=None):
        """Reboot the guest through busybox init and wait until its control agent replies again.

        The initramfs is unpacked afresh, and the overlay disk keeps every
        file written before, so enabled init scripts in /etc/rc.d start again.
        """
        self._require(RUNNING, action="reboot()")
        timeout = self.boot_timeout if timeout is None else timeout
        started = time.monotonic()
        old_boot_id = self.boot_id
        with self._request_lock:
            self._current_channel().request("reboot", REPLY_MARGIN)
            try:
                self.boot_id = self._wait_for_agent(old_boot_id, started + timeout)
            except GuestError as error:
                raise GuestBootError("the guest did not come back after reboot: %s%s"
                                     % (error, self._failure_detail())) from None
        self.boot_seconds = time.monotonic() - started
        log.info("guest PID %d rebooted in %.1f s, boot id %s", self.pid, self.boot_seconds,
                 self.boot_id)

    # Guest access

    def execute(self, cmd, timeout=30.0):
        """Run `cmd` with the guest's /bin/sh and return a CommandResult.

        Raises GuestTimeoutError when the command outlives `timeout` seconds
        (the guest kills its process group). The command's stdin is
        /dev/null and it runs in /root in a session of its own. Jobs it
        starts in the background keep running after it returns, and their
        output is discarded.
        """
        self._require(RUNNING, action="execute()")
        with self._request_lock:
            reply = self._current_channel().request("run", timeout + REPLY_MARGIN, cmd=cmd,
                                                    timeout=timeout)
        stdout = base64.b64decode(reply["stdout"]).decode("utf-8", "replace")
        stderr = base64.b64decode(reply["stderr"]).decode("utf-8", "replace")
        if reply.get("timed_out"):
            raise GuestTimeoutError("guest command %r ran past %.1f s and was killed; output so "
                                    "far: %r %r" % (cmd, timeout, stdout[-500:], stderr[-500:]))
        return CommandResult(reply["status"], stdout, stderr)

    def put_file(self, local_path, guest_path, mode=None):
        """Copy a host file to `guest_path`, creating parent directories; the file appears whole or not at all.

        `mode` defaults to the local file's permission bits.
        """
        self._require(RUNNING, action="put_file()")
        if mode is None:
            mode = stat.S_IMODE(os.stat(local_path).st_mode)
        with open(local_path, "rb") as handle:
            data = handle.read()
        chunks = [data[offset:offset + PUT_CHUNK_BYTES]
                  for offset in range(0, len(data), PUT_CHUNK_BYTES)] or [b""]
        with self._request_lock:
            channel = self._current_channel()
            for index, chunk in enumerate(chunks):
                channel.request("put", REPLY_MARGIN, path=guest_path,
                                data=base64.b64encode(chunk).decode("ascii"),
                                first=index == 0, final=index == len(chunks) - 1, mode=mode)

    # Internals

    def _prepare_workdir(self, image):
        """Create the overlay disk on first use and write the broker forwarder script.

        Returns the script's path, or None when broker_port is None.
        """
        if not os.path.exists(self.overlay_disk):
            _copy_sparse(image.overlay_template, self.overlay_disk)
        return self._write_broker_forwarder(image.busybox)

    def _qemu_argv(self, image, forwarder):
        self.accelerator = "kvm" if kvm_usable(image.kernel) else "tcg"
        netdev = user_netdev("net0", forwarder, self.hostfwd)
        append = "console=ttyS0 spotfi.overlay=/dev/vda %s" % self.kernel_args
        return [
            find_qemu(), "-accel", self.accelerator, "-m", self.memory, "-smp", "1",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-kernel", _escape(image.kernel), "-initrd", _escape(image.initramfs),
            "-append", append.strip(),
            "-chardev", "file,id=console,append=on,path=%s" % _escape(self.console_log),
            "-serial", "chardev:console",
            "-drive", "file=%s,if=virtio,format=raw" % _escape(self.overlay_disk),
            "-netdev", netdev,
            "-device", "virtio-net-pci,netdev=net0,id=%s,mac=52:54:00:12:34:56" % NIC_ID,
            "-device", "virtio-serial-pci,id=serial0",
            "-chardev", "socket,id=control,path=%s,server=on,wait=off"
            % _escape(self._socket_path("control.sock")),
            "-device", "virtserialport,bus=serial0.0,chardev=control,name=org.spotfi.control",
            "-qmp", "unix:%s,server=on,wait=off" % _escape(self._socket_path("qmp.sock")),
        ] + self.qemu_args

    def _launch(self):
        """Start one QEMU process for the next boot; the caller holds _process_lock."""
        try:
            self._console_offset = os.path.getsize(self.console_log)
        except OSError:
            self._console_offset = 0
        self._process = self._popen_qemu(self._argv, ("control.sock", "qmp.sock"))
        log.info("started QEMU with PID %d (%s, %s)", self._process.pid, self.accelerator,
                 self.memory)

    def _watch(self):
        """Relaunch QEMU when the guest rebooted; mark the guest stopped when it powered off."""
        while True:
            process = self._process
            if process is None:
                return
            status = process.wait()
            with self._process_lock:
                if self._stopping or self._process is not process:
                    return
                kill_process_group(process.pid)
                if self._guest_requested_reboot():
                    self.reboots += 1
                    self._launch()
                    continue
                log.warning("QEMU PID %d exited with status %s without a reboot request; "
                            "console end:\n%s", process.pid, status, self.read_console(2000))
                self._process = None
                if self._state == RUNNING:
                    self._state = STOPPED
                return

    def _guest_requested_reboot(self):
        with open(self.console_log, "rb") as console:
            console.seek(self._console_offset)
            output = console.read()
        # busybox init prints the first, the kernel (at KERN_EMERG, so even
        # with "quiet") the second.
        return b"Requesting system reboot" in output or b"reboot: Restarting system" in output

    def _current_channel(self):
        """Return the control channel to the running QEMU, connecting after a relaunch."""
        process = self._process
        if process is None or process.poll() is not None:
            raise GuestError("QEMU is not running (the guest is stopped or between two boots); "
                             "call wait_ready() after a reboot")
        if self._channel_process is not process:
            if self._channel is not None:
                self._channel.close()
            self._channel = ControlChannel(self._socket_path("control.sock"), 10.0,
                                           is_alive=lambda: process.poll() is None)
            self._channel_process = process
        return self._channel

    def _wait_for_agent(self, old_boot_id, deadline):
        """Ping until an agent of a boot other than `old_boot_id` replies; return its boot id.

        Pings sent before the guest opens its port queue up in the socket, and
        the channel drops the replies to all but the latest. While QEMU is
        between two boots, the wait goes on for the watcher's relaunch.
        """
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise GuestTimeoutError("the control agent did not reply in time")
            if self._process is None:
                raise GuestError("QEMU exited and was not relaunched; see qemu.log")
            try:
                channel = self._current_channel()
                reply = channel.wait_reply(channel.send("ping"), min(1.0, remaining))
            except GuestTimeoutError:
                continue
            except (GuestError, OSError):
                time.sleep(0.05)
                continue
            if reply.get("boot_id") != old_boot_id:
                return reply["boot_id"]
            time.sleep(0.1)

    def _stop_process(self):
        """SIGKILL QEMU by its PID, then anything left in its process group (the nc forwarders)."""
        with self._process_lock:
            self._stopping = True
            process = self._process
            self._process = None
            if process is not None:
                kill_qemu(process)
        with self._request_lock:
            if self._channel is not None:
                self._channel.close()
            self._channel = None
            self._channel_process = None
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join()
            self._watcher = None
        if self._state == RUNNING:
            self._state = STOPPED


def _copy_sparse(source, target, block=65536):
    zero = bytes(block)
    with open(source, "rb") as reader, open(target, "wb") as writer:
        while True:
            data = reader.read(block)
            if not data:
                break
            if data == zero[:len(data)]:
                writer.seek(len(data), os.SEEK_CUR)
            else:
                writer.write(data)
        writer.truncate()


def _escape(value):
    """Escape a value for a QEMU option list, where a comma is written as two."""
    return value.replace(",", ",,")
