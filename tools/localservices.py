"""Start and stop throwaway mosquitto, amqtt and redis-server processes on 127.0.0.1.

Used by the test suite, `make demo` and `make bench`. Each service gets a free
port and its own directory, and is stopped by the PID this module started.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time


class ServiceError(Exception):
    """Raised when a local service cannot be started."""


def free_port():
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port, process, timeout=10.0):
    """Wait until 127.0.0.1:port accepts connections or `process` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServiceError("%s exited with status %s before listening on port %d"
                               % (process.args[0], process.returncode, port))
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise ServiceError("nothing listened on 127.0.0.1:%d after %.0f s" % (port, timeout))


def find_binary(name):
    """Return the path of a server binary, looking in /usr/sbin as well as PATH."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
    if path is None:
        raise ServiceError("%s is not installed; run `make system-deps` or "
                           "`apt-get install %s`" % (name, name))
    return path


class LocalService:
    """One server process started by this module, stopped by its PID."""

    def __init__(self, name, argv, port, workdir, log_path):
        self.name = name
        self.argv = argv
        self.port = port
        self.workdir = workdir
        self.log_path = log_path
        self.process = None

    def start(self):
        if self.process is not None and self.process.poll() is None:
            raise ServiceError("%s is already running with PID %d" % (self.name, self.process.pid))
        log = open(self.log_path, "ab")
        try:
            self.process = subprocess.Popen(self.argv, cwd=self.workdir, stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        finally:
            log.close()
        wait_for_port(self.port, self.process)
        return self

    def stop(self, sig=signal.SIGTERM, timeout=5.0):
        """Stop the process this object started; SIGKILL it if it outlives `timeout`."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        self.process = None

    def restart(self):
        self.stop()
        return self.start()

    @property
    def running(self):
        return self.process is not None and self.process.poll() is None

    def log_tail(self, size=4000):
        try:
            with open(self.log_path, "rb") as log:
                return log.read()[-size:].decode("utf-8", "replace")
        except OSError:
            return ""


def mosquitto(workdir, port=None, password_file=None, extra_lines=()):
    """Build (not start) a mosquitto 2 service on 127.0.0.1.

    Without `password_file` the broker allows anonymous clients, which is
    enough for tests that do not check authentication.
    """
    port = port or free_port()
    os.makedirs(workdir, exist_ok=True)
    conf = os.path.join(workdir, "mosquitto.conf")
    lines = [
        "listener %d 127.0.0.1" % port,
        "persistence false",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "connection_messages true",
        "max_keepalive 65535",
        # Production brokers (EMQX) disable Nagle's algorithm; mosquitto does
        # not by default, which adds delayed-ACK waits to every round trip.
        "set_tcp_nodelay true",
    ]
    if os.geteuid() == 0:
        # Started as root, mosquitto switches to the `mosquitto` user, which
        # cannot read files in the caller's private temporary directories.
        import pwd
        lines.append("user %s" % pwd.getpwuid(os.geteuid()).pw_name)
    if password_file:
        lines += ["allow_anonymous false", "password_file %s" % password_file]
    else:
        lines += ["allow_anonymous true"]
    lines += list(extra_lines)
    with open(conf, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    argv = [find_binary("mosquitto"), "-c", conf]
    return LocalService("mosquitto", argv, port, workdir, os.path.join(workdir, "mosquitto.log"))


def write_password_file(path, users):
    """Write a mosquitto password file for {username: password} with mosquitto_passwd."""
    tool = find_binary("mosquitto_passwd")
    open(path, "w").close()
    os.chmod(path, 0o600)
    for username, password in users.items():
        subprocess.run([tool, "-b", path, username, password], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return path


def amqtt(workdir, port=None):
    """Build (not start) an amqtt broker on 127.0.0.1 that allows anonymous clients.

    amqtt 0.12.1 supports only MQTT 3.1.1, so it is the real broker for the
    tests of the fall-back from MQTT 5. It runs from the `amqtt` console
    script beside the running interpreter, which requirements/dev.txt
    installs. Debug logging makes its log list every packet, which
    amqtt_connect_levels() reads.
    """
    script = os.path.join(os.path.dirname(sys.executable), "amqtt")
    if not os.access(script, os.X_OK):
        raise ServiceError("amqtt is not installed beside %s; run `make venv` or "
                           "`pip install -r requirements/dev.txt`" % sys.executable)
    port = port or free_port()
    os.makedirs(workdir, exist_ok=True)
    conf = os.path.join(workdir, "amqtt.yaml")
    # Without a `plugins` key amqtt loads its default set, which also
    # publishes $SYS topics every 20 s, so the two plugins needed are listed.
    lines = [
        "listeners:",
        "  default:",
        "    type: tcp",
        "    bind: 127.0.0.1:%d" % port,
        "plugins:",
        "  amqtt.plugins.logging_amqtt.PacketLoggerPlugin:",
        "  amqtt.plugins.authentication.AnonymousAuthPlugin:",
        "    allow_anonymous: true",
    ]
    with open(conf, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    argv = [script, "-c", conf, "-d"]
    return LocalService("amqtt", argv, port, workdir, os.path.join(workdir, "amqtt.log"))


def amqtt_connect_levels(service):
    """Return the protocol level of each CONNECT that an amqtt service has logged, in order.

    MQTT 3.1.1 is level 4 and MQTT 5 is level 5. amqtt logs a CONNECT
    shortly after it reads it, so a caller may have to wait for the last one.
    """
    try:
        with open(service.log_path, "rb") as log:
            text = log.read().decode("utf-8", "replace")
    except OSError:
        return []
    return [int(level) for level in re.findall(r"<-in-- ConnectPacket\(.*?proto_level=(\d+)", text)]


def redis(workdir, port=None):
    """Build (not start) a redis-server on 127.0.0.1 that keeps nothing on disk."""
    port = port or free_port()
    os.makedirs(workdir, exist_ok=True)
    argv = [find_binary("redis-server"), "--port", str(port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", workdir, "--daemonize", "no"]
    return LocalService("redis-server", argv, port, workdir, os.path.join(workdir, "redis.log"))
