"""Processes and observers for the end-to-end tests.

RouterUnderTest is what the end-to-end suites need from a router running
the agent. HostRouter runs the real agent as a child process against a fake
root tree (its UCI file written as an operator would); GuestRouter
(tests/routers.py) installs the agent's ipk in a QEMU guest. MqttObserver is
a paho-mqtt subscriber standing where the cloud API would be. RefApi runs
the reference API as a child process. Each is stopped by the PID it started.
"""

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import paho.mqtt.client as paho

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_BIN = os.path.join(ROOT, "tests", "bin")
UBUS_TEST_DOUBLE = os.path.join(TEST_BIN, "ubus_test_double")


def python_path():
    return os.pathsep.join([os.path.join(ROOT, "agent"), os.path.join(ROOT, "refapi"),
                            os.path.join(ROOT, "tools")])


def wait_until(predicate, timeout, interval=0.02, message="condition"):
    """Poll predicate() until it returns a true value; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %.1f s waiting for %s" % (timeout, message))
        time.sleep(interval)


def uci_quote(value):
    return "'" + str(value).replace("'", "'\\''") + "'"


def write_uci(path, options, lists=None):
    """Write /etc/config/spotfi with one `config agent 'main'` section."""
    lines = ["config agent 'main'"]
    for name, value in options.items():
        lines.append("\toption %s %s" % (name, uci_quote(value)))
    for name, values in (lists or {}).items():
        for value in values:
            lines.append("\tlist %s %s" % (name, uci_quote(value)))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")


def parse_children(stat_lines, pid):
    """Return [(child pid, state letter)] of process `pid` from lines of /proc/<pid>/stat."""
    children = []
    for line in stat_lines:
        if ")" not in line:
            continue
        child = line.split(" ", 1)[0]
        fields = line.rsplit(")", 1)[1].split()
        if len(fields) >= 2 and child.isdigit() and int(fields[1]) == pid:
            children.append((int(child), fields[0]))
    return children


class RouterUnderTest:
    """A router running spotfi-agent, as the end-to-end suites drive it.

    Implementations: HostRouter (the agent as a process of this host) and
    GuestRouter in tests/routers.py (the agent installed from its ipk in a
    QEMU guest). Members:

    - `kind` ("host" or "qemu") and `router_id`;
    - start() starts the agent and returns self; stop() stops the agent;
      close() stops the agent and releases everything the router holds;
    - add_handler_file(name, content) writes an operator handler file,
      before start() (the agent reads handlers when it starts);
    - shell(command) runs a /bin/sh command on the router, returns its stdout;
    - agent_pid(), child_processes(pid), open_fd_count(pid) inspect the
      agent's process on the router;
    - ubus_test_double() is a context manager in which `ubus` on the
      agent's PATH is tests/bin/ubus_test_double;
    - log_text() returns the agent's log.
    """

    kind = None
    router_id = None

    def shell(self, command, timeout=30.0):
        raise NotImplementedError("%s does not run shell commands" % type(self).__name__)


class HostRouter(RouterUnderTest):
    """The agent under test, run on this host as `python -m spotfi_agent run --root DIR`."""

    kind = "host"

    def __init__(self, workdir, router_id, broker_ports, token="test-token", options=None,
                 with_ubus=True, transport="native", interpreter=None):
        self.workdir = str(workdir)
        self.router_id = router_id
        self.broker_ports = list(broker_ports)
        self.token = token
        self.transport = transport
        self.interpreter = interpreter or [sys.executable]
        self.root = os.path.join(self.workdir, "root")
        self.log_path = os.path.join(self.workdir, "agent-%s.log" % router_id)
        self.process = None
        self.with_ubus = with_ubus
        self.options = {
            "enabled": "1",
            "token": token,
            "router_id": router_id,
            "metrics_interval": "30",
            "keepalive": "10",
            "transport": transport,
            "tunnel_shell": "/bin/sh",
            "log_level": "debug",
        }
        self.options.update(options or {})
        self._prepare_root()

    def _prepare_root(self):
        os.makedirs(os.path.join(self.root, "etc", "spotfi", "handlers.d"), exist_ok=True)
        os.makedirs(os.path.join(self.root, "bin"), exist_ok=True)
        shell_link = os.path.join(self.root, "bin", "sh")
        if not os.path.exists(shell_link):
            os.symlink("/bin/sh", shell_link)
        proc_link = os.path.join(self.root, "proc")
        if not os.path.exists(proc_link):
            os.symlink("/proc", proc_link)
        self.bin_dir = os.path.join(self.workdir, "bin")
        os.makedirs(self.bin_dir, exist_ok=True)
        ubus_link = os.path.join(self.bin_dir, "ubus")
        if self.with_ubus and not os.path.exists(ubus_link):
            os.symlink(UBUS_TEST_DOUBLE, ubus_link)
        self.write_config()

    def write_config(self):
        brokers = ["mqtt://127.0.0.1:%d" % port for port in self.broker_ports]
        write_uci(os.path.join(self.root, "etc", "config", "spotfi"), self.options,
                  {"broker": brokers})

    def add_handler_file(self, name, content):
        path = os.path.join(self.root, "etc", "spotfi", "handlers.d", name)
        with open(path, "w") as handle:
            handle.write(content if isinstance(content, str) else json.dumps(content))
        return path

    def environment(self):
        env = {key: value for key, value in os.environ.items() if not key.startswith("SPOTFI_")}
        env["PYTHONPATH"] = python_path()
        env["MICROPYPATH"] = os.path.join(ROOT, "agent")
        env["PATH"] = self.bin_dir + ":/usr/bin:/bin:/usr/sbin:/sbin"
        return env

    def start(self):
        log = open(self.log_path, "ab")
        try:
            self.process = subprocess.Popen(
                self.interpreter + ["-m", "spotfi_agent", "--root", self.root, "run"],
                env=self.environment(), stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, cwd=self.workdir)
        finally:
            log.close()
        return self

    @property
    def pid(self):
        return self.process.pid

    def signal(self, signum):
        self.process.send_signal(signum)

    def kill(self):
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def wait(self, timeout):
        return self.process.wait(timeout)

    def stop(self):
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def close(self):
        self.stop()

    def log_text(self):
        try:
            with open(self.log_path, "rb") as handle:
                return handle.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def shell(self, command, timeout=30.0):
        result = subprocess.run(["/bin/sh", "-c", command], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, env=self.environment(), timeout=timeout)
        return result.stdout.decode("utf-8", "replace")

    def agent_pid(self):
        return self.pid

    def child_processes(self, pid):
        lines = []
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open("/proc/%s/stat" % name) as handle:
                    lines.append(handle.read())
            except OSError:
                continue
        return parse_children(lines, pid)

    def open_fd_count(self, pid):
        return len(os.listdir("/proc/%d/fd" % pid))

    @contextlib.contextmanager
    def ubus_test_double(self):
        """Make sure the test double is the agent's `ubus`; a link made here goes again on exit."""
        link = os.path.join(self.bin_dir, "ubus")
        created = not os.path.lexists(link)
        if created:
            os.symlink(UBUS_TEST_DOUBLE, link)
        try:
            yield
        finally:
            if created:
                os.remove(link)


class MqttObserver:
    """A paho subscriber that records every message it receives."""

    def __init__(self, port, topics, client_id=None):
        self.messages = []
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2,
                                  client_id=client_id or "observer-%d-%d" % (os.getpid(), id(self)))
        self.client.on_message = self._on_message
        self.client.on_connect = lambda *args: self._connected.set()
        self.topics = topics
        self.client.connect("127.0.0.1", port, 30)
        self.client.loop_start()
        if not self._connected.wait(10):
            raise AssertionError("observer could not connect to 127.0.0.1:%d" % port)
        for topic in topics:
            self.client.subscribe(topic, 1)

    def _on_message(self, client, userdata, message):
        with self._lock:
            self.messages.append((message.topic, bytes(message.payload), message.retain))

    def on(self, topic):
        with self._lock:
            return [(payload, retain) for name, payload, retain in self.messages if name == topic]

    def wait_for(self, topic, predicate=lambda payload: True, timeout=10.0):
        def found():
            for payload, retain in self.on(topic):
                if predicate(payload):
                    return (payload, retain)
            return None
        return wait_until(found, timeout, message="a message on %s" % topic)

    def publish(self, topic, payload, qos=1, retain=False):
        info = self.client.publish(topic, payload, qos, retain)
        info.wait_for_publish(10)

    def close(self):
        # disconnect() first wakes paho's network thread, which loop_stop()
        # would otherwise wait out for up to a second in select().
        self.client.disconnect()
        self.client.loop_stop()


def fresh_status(port, router_id, timeout=5.0):
    """Return the retained status a new subscriber receives for router_id."""
    observer = MqttObserver(port, ["spotfi/router/%s/status" % router_id])
    try:
        payload, retain = observer.wait_for("spotfi/router/%s/status" % router_id, timeout=timeout)
        return payload.decode(), retain
    finally:
        observer.close()


class RefApi:
    """The reference API as a child process (`python -m spotfi_refapi`)."""

    def __init__(self, workdir, broker_port, redis_port, instance_id="refapi-test",
                 database_url=None, port=None):
        import localservices
        self.workdir = str(workdir)
        self.port = port or localservices.free_port()
        self.instance_id = instance_id
        self.database_path = os.path.join(self.workdir, "refapi.db")
        self.env = {key: value for key, value in os.environ.items()}
        self.env.update({
            "PYTHONPATH": python_path(),
            "MQTT_BROKER_URL": "mqtt://127.0.0.1:%d" % broker_port,
            "REDIS_URL": "redis://127.0.0.1:%d/0" % redis_port,
            "DATABASE_URL": database_url or "sqlite:///" + self.database_path,
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "INSTANCE_ID": instance_id,
        })
        self.log_path = os.path.join(self.workdir, "refapi-%s.log" % instance_id)
        self.process = None

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.port

    def start(self):
        log = open(self.log_path, "ab")
        try:
            self.process = subprocess.Popen([sys.executable, "-m", "spotfi_refapi"], env=self.env,
                                            stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, cwd=self.workdir)
        finally:
            log.close()
        try:
            wait_until(self._healthy, 20, 0.1, "refapi %s /health" % self.instance_id)
        except BaseException:
            self.stop()
            raise
        return self

    def _healthy(self):
        if self.process.poll() is not None:
            raise AssertionError("refapi exited with %s:\n%s" % (self.process.returncode, self.log_text()))
        try:
            status, body = self.request("GET", "/health")
        except OSError:
            return False
        return status == 200 and body.get("status") == "ok"

    def request(self, method, path, body=None, timeout=60):
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            payload = error.read()
            try:
                return error.code, json.loads(payload)
            except ValueError:
                return error.code, {"raw": payload.decode("utf-8", "replace")}

    def rpc(self, router_id, path, method, args=None, timeout=None):
        body = {"path": path, "method": method, "args": args or {}}
        if timeout is not None:
            body["timeout"] = timeout
        return self.request("POST", "/routers/%s/rpc" % router_id, body)

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def log_text(self):
        try:
            with open(self.log_path, "rb") as handle:
                return handle.read().decode("utf-8", "replace")
        except OSError:
            return ""


class Expect:
    """A terminal_session() step: wait until the output so far contains `text`."""

    def __init__(self, text):
        self.text = text


async def terminal_session(api_url, router_id, commands, cols=80, rows=24, until=None,
                           timeout=30.0):
    """Open WS /x to `router_id`, send each command, return (output bytes, control messages).

    A bytes command is sent as terminal input, a dict as a JSON control
    message (e.g. resize), and an Expect waits for its text in the output
    before the next one goes. The session ends when `until(output)` is true,
    on an exit or error control message, or fails after `timeout` seconds.
    """
    import aiohttp

    output = bytearray()
    controls = []
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect("%s/x?routerId=%s&cols=%d&rows=%d"
                                      % (api_url, router_id, cols, rows)) as ws:
            async def reader():
                async for message in ws:
                    if message.type == aiohttp.WSMsgType.BINARY:
                        output.extend(message.data)
                        if until is not None and until(bytes(output)):
                            return
                    elif message.type == aiohttp.WSMsgType.TEXT:
                        controls.append(json.loads(message.data))
                        if controls[-1].get("type") in ("exit", "error"):
                            return

            async def writer(task):
                for command in commands:
                    if isinstance(command, Expect):
                        while command.text not in output:
                            if task.done():
                                raise AssertionError("the terminal session ended before %r "
                                                     "appeared; output: %r"
                                                     % (command.text, bytes(output[-500:])))
                            await asyncio.sleep(0.05)
                    elif isinstance(command, dict):
                        await ws.send_str(json.dumps(command))
                    else:
                        await ws.send_bytes(command)
                    await asyncio.sleep(0.1)
                await task

            task = asyncio.ensure_future(reader())
            try:
                await asyncio.wait_for(writer(task), timeout)
            finally:
                task.cancel()
    return bytes(output), controls
