"""The router under test: the agent as a host process or installed in a QEMU guest.

make_router("host", ...) returns a HostRouter (tests/harness.py) and
make_router("qemu", ...) a GuestRouter. Suites parametrize a fixture over
ROUTER_KINDS to run the same cases against both; the "qemu" parameter
carries the `qemu` marker.

GuestRouter sets up the agent as an operator sets up a router: it builds the
ipk with tools/build_ipk.py, installs it, writes /etc/config/spotfi, then
runs `/etc/init.d/spotfi-agent enable` and `start`. In the QEMU stand-in
(qemu/README.md) installing is /usr/sbin/ipk-install, which takes opkg's
steps (data on /, then the postinst, which runs the uci-defaults script),
and the config file is written whole, because the stand-in has no `uci`.
With OPENWRT_IMAGE and OPENWRT_IPK_DIR set, the guest is real OpenWrt and
the same steps are `opkg install`, `uci set` and `uci commit`.
"""

import contextlib
import json
import os
import shutil
import sys

import pytest

from harness import (ROOT, UBUS_TEST_DOUBLE, HostRouter, RouterUnderTest, parse_children,
                     uci_quote, write_uci)

QEMU_DIR = os.path.join(ROOT, "qemu")
if QEMU_DIR not in sys.path:
    sys.path.insert(0, QEMU_DIR)

import build_ipk  # noqa: E402
from spotfi_qemu import GUEST_BROKER_HOST, GUEST_BROKER_PORT, Guest, build_image  # noqa: E402
from spotfi_qemu.openwrt import TRANSFER_MOUNT, OpenWrtGuest  # noqa: E402

ROUTER_KINDS = ["host", pytest.param("qemu", marks=pytest.mark.qemu)]

GUEST_BROKER_URL = "mqtt://%s:%d" % (GUEST_BROKER_HOST, GUEST_BROKER_PORT)
GUEST_IPK_PATH = "/tmp/spotfi-agent.ipk"
INIT_SCRIPT = "/etc/init.d/spotfi-agent"
CONFIG_PATH = "/etc/config/spotfi"
HANDLERS_DIR = "/etc/spotfi/handlers.d"
# The test double keeps its name in the guest. Only its link on PATH is named `ubus`.
UBUS_DOUBLE_PATH = "/usr/libexec/ubus_test_double"
UBUS_LINK_PATH = "/usr/bin/ubus"


class RouterSetupError(Exception):
    """Raised when the guest router cannot be set up: boot, install, configuration or start."""


def require_qemu():
    """Skip the calling test when qemu-system-x86_64 is missing; fail it under CI=true."""
    if shutil.which("qemu-system-x86_64") is None:
        message = ("qemu-system-x86_64 is not installed; run `make qemu-image`, which installs "
                   "qemu-system-x86")
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


def openwrt_settings(environ=None):
    """Return (image path, ipk directory) from OPENWRT_IMAGE and OPENWRT_IPK_DIR, or None."""
    environ = os.environ if environ is None else environ
    image = environ.get("OPENWRT_IMAGE", "")
    if not image:
        return None
    ipk_dir = environ.get("OPENWRT_IPK_DIR", "")
    if not os.path.isdir(ipk_dir):
        raise RouterSetupError(
            "OPENWRT_IMAGE is set, so OPENWRT_IPK_DIR must name a directory with the ipks "
            "spotfi-agent depends on (python3-light, python3-logging, python3-openssl, "
            "python3-ptyprocess and their dependencies) for that OpenWrt release; it is %r"
            % ipk_dir)
    return image, ipk_dir


def make_router(kind, workdir, router_id, broker_port, options=None):
    """Return a router of `kind` ("host" or "qemu") connecting to the broker on 127.0.0.1:`broker_port`."""
    if kind == "host":
        return HostRouter(workdir, router_id, [broker_port], options=options)
    if kind == "qemu":
        require_qemu()
        return GuestRouter(workdir, router_id, broker_port, options=options)
    raise ValueError("unknown router kind %r; use 'host' or 'qemu'" % kind)


class GuestRouter(RouterUnderTest):
    """The agent installed from its ipk in a QEMU guest, started by its init script.

    `guest` is the Guest (qemu/spotfi_qemu/guest.py) or, with OPENWRT_IMAGE
    set, the OpenWrtGuest; tests cut its link, reboot or kill it directly.
    `options` are written to /etc/config/spotfi over the defaults below,
    with `list broker` pointing at the host broker through QEMU.
    """

    kind = "qemu"

    def __init__(self, workdir, router_id, broker_port, token="test-token", options=None,
                 memory="256M"):
        self.workdir = str(workdir)
        self.router_id = router_id
        self.broker_port = broker_port
        self.options = {
            "enabled": "1",
            "token": token,
            "router_id": router_id,
            "keepalive": "10",
            "metrics_interval": "30",
        }
        self.options.update(options or {})
        self.install_output = None
        self._handler_files = {}
        self._ubus_copied = False
        self._started = False
        os.makedirs(self.workdir, exist_ok=True)

        self.openwrt = openwrt_settings()
        self.package_dir = os.path.join(self.workdir, "packages")
        if self.openwrt is None:
            self.guest = Guest(os.path.join(self.workdir, "guest"), broker_port=broker_port,
                               memory=memory, image=build_image())
        else:
            image, _ = self.openwrt
            self.guest = OpenWrtGuest(os.path.join(self.workdir, "guest"), broker_port, image,
                                      transfer_dir=self.package_dir, memory=memory)

    # Set-up, in the order an operator takes the steps

    def start(self):
        """Build the ipk, boot the guest, install, configure, enable and start the agent; return self."""
        self.ipk_path = self._build_package()
        self.guest.start()
        self.install_output = self._install()
        self._configure()
        for name, content in sorted(self._handler_files.items()):
            self._put_text("%s/%s" % (HANDLERS_DIR, name), content, 0o644)
        self._checked("%s enable && %s start" % (INIT_SCRIPT, INIT_SCRIPT))
        self._started = True
        return self

    def _build_package(self):
        """Build the ipk into this router's workdir (with OpenWrt, next to the dependency ipks)."""
        os.makedirs(self.package_dir, exist_ok=True)
        if self.openwrt is not None:
            _, ipk_dir = self.openwrt
            for name in sorted(os.listdir(ipk_dir)):
                if name.endswith(".ipk"):
                    shutil.copyfile(os.path.join(ipk_dir, name), os.path.join(self.package_dir, name))
        path, _ = build_ipk.build_ipk(ROOT, self.package_dir)
        return path

    def _install(self):
        if self.openwrt is None:
            self.guest.put_file(self.ipk_path, GUEST_IPK_PATH, 0o644)
            command = "ipk-install %s" % GUEST_IPK_PATH
        else:
            # opkg resolves the dependencies among the files it is given.
            command = "opkg install %s/*.ipk" % TRANSFER_MOUNT
        return self._checked(command, timeout=300.0)

    def _configure(self):
        """Write /etc/config/spotfi: the whole file in the stand-in, `uci set` on OpenWrt."""
        if self.openwrt is None:
            local = os.path.join(self.workdir, "spotfi.uci")
            write_uci(local, self.options, {"broker": [GUEST_BROKER_URL]})
            self.guest.put_file(local, CONFIG_PATH, 0o600)
            return
        commands = ["uci -q delete spotfi.main.broker",
                    "uci add_list spotfi.main.broker=%s" % uci_quote(GUEST_BROKER_URL)]
        for name, value in self.options.items():
            commands.append("uci set spotfi.main.%s=%s" % (name, uci_quote(value)))
        commands.append("uci commit spotfi")
        # `uci -q delete` fails when the option is absent, which is fine.
        self._checked(commands[0] + "; " + " && ".join(commands[1:]))

    def add_handler_file(self, name, content):
        """Write an operator handler file; before start() it is written during set-up."""
        if not isinstance(content, str):
            content = json.dumps(content)
        self._handler_files[name] = content
        if self._started:
            self._put_text("%s/%s" % (HANDLERS_DIR, name), content, 0o644)
        return "%s/%s" % (HANDLERS_DIR, name)

    # RouterUnderTest

    def stop(self):
        self._checked("%s stop" % INIT_SCRIPT)

    def close(self):
        """Power the guest off (QEMU is killed); its workdir with the disk stays for inspection."""
        self.guest.close()

    def shell(self, command, timeout=30.0):
        _, output = self.guest.run(command, timeout)
        return output

    def agent_pid(self):
        # The kernel names a script's process after the script, so `pidof`
        # finds the agent by /usr/bin/spotfi-agent although python3 runs it.
        output = self.shell("pidof spotfi-agent").split()
        if len(output) != 1:
            raise AssertionError("expected one spotfi-agent process in the guest, found %r; "
                                 "log:\n%s" % (output, self.log_text()[-3000:]))
        return int(output[0])

    def child_processes(self, pid):
        return parse_children(self.shell("cat /proc/[0-9]*/stat 2>/dev/null").splitlines(), pid)

    def open_fd_count(self, pid):
        return int(self._checked("ls /proc/%d/fd | wc -l" % pid).stdout.strip())

    @contextlib.contextmanager
    def ubus_test_double(self):
        """Put tests/bin/ubus_test_double on the agent's PATH as `ubus` until the block ends.

        The guest has no ubus of its own (on OpenWrt, /bin/ubus comes after
        /usr/bin on procd's PATH, so the link hides it for the block).
        """
        if not self._ubus_copied:
            self.guest.put_file(UBUS_TEST_DOUBLE, UBUS_DOUBLE_PATH, 0o755)
            self._ubus_copied = True
        self._checked("{{ [ ! -e {link} ] || [ -L {link} ]; }} && ln -sf {double} {link}".format(
            link=UBUS_LINK_PATH, double=UBUS_DOUBLE_PATH))
        try:
            yield
        finally:
            if self.guest.state == "running":
                self._checked("rm -f %s" % UBUS_LINK_PATH)

    def log_text(self):
        if self.guest.state != "running":
            return ""
        return self.shell("logread -e spotfi-agent")

    # Helpers

    def _checked(self, command, timeout=60.0):
        result = self.guest.execute(command, timeout)
        if result.status != 0:
            raise RouterSetupError("guest command %r exited with %d:\n%s\n%s"
                                   % (command, result.status, result.stdout[-2000:],
                                      result.stderr[-2000:]))
        return result

    def _put_text(self, guest_path, text, mode):
        local = os.path.join(self.workdir, "upload-" + os.path.basename(guest_path))
        with open(local, "w") as handle:
            handle.write(text)
        self.guest.put_file(local, guest_path, mode)
