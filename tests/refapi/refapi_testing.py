"""Helpers for the refapi tests: an in-process API instance, a scripted router, HTTP calls."""

import asyncio
import base64
import dataclasses
import json
import os
import pwd
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid

import paho.mqtt.client as mqtt

import localservices
from spotfi_refapi import config
from spotfi_refapi.service import Service

WAIT = 10.0  # generous upper bound for anything the tests wait for


def wait_until(predicate, timeout=WAIT, interval=0.02, message="condition"):
    """Poll `predicate` until it returns a true value and return that value.

    Raise AssertionError after `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %g s waiting for %s" % (timeout, message))
        time.sleep(interval)


def http_json(method, url, body=None, timeout=60.0):
    """Send one HTTP request and return (status, decoded JSON body or None)."""
    data = None
    headers = {}
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, None


def new_router_id(label="router"):
    """Return a router id no other test uses, so tests sharing a broker and Redis stay apart."""
    return "%s-%s" % (label, uuid.uuid4().hex[:10])


class RefapiInstance:
    """A reference API Service running in its own thread and event loop."""

    def __init__(self, settings):
        self.settings = settings
        self.service = None
        self._loop = None
        self._thread = None
        self._ready = threading.Event()
        self._stop = None
        self._error = None

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.service.port

    def start(self):
        self._thread = threading.Thread(target=self._main, name="refapi-" +
                                        self.settings.instance_id, daemon=True)
        self._thread.start()
        if not self._ready.wait(WAIT) or self._error is not None:
            raise RuntimeError("refapi instance %s did not start: %r"
                               % (self.settings.instance_id, self._error))
        wait_until(self.service.broker.connected.is_set, message="the MQTT connection")
        return self

    def _main(self):
        asyncio.run(self._serve())

    async def _serve(self):
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.service = Service(self.settings)
        try:
            await self.service.start()
        except Exception as error:
            self._error = error
            self._ready.set()
            await self.service.stop()
            return
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await self.service.stop()

    def run(self, coroutine_function, *args):
        """Run `coroutine_function(*args)` on the instance's loop and return its result."""
        future = asyncio.run_coroutine_threadsafe(coroutine_function(*args), self._loop)
        return future.result(WAIT)

    def stop(self):
        if self._thread is None:
            return
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(WAIT)
        self._thread = None


def make_settings(broker_port, redis_port, database_url, instance_id=None, **overrides):
    """Build Settings for a test instance on a free HTTP port."""
    argv = ["--mqtt-broker-url", "mqtt://127.0.0.1:%d" % broker_port,
            "--redis-url", "redis://127.0.0.1:%d/0" % redis_port,
            "--database-url", database_url,
            "--port", str(localservices.free_port()),
            "--instance-id", instance_id or "test%s" % uuid.uuid4().hex[:6]]
    settings = config.parse_settings(argv, {})
    return dataclasses.replace(settings, **overrides)


class ScriptedRouter:
    """A protocol peer standing in for the agent only in refapi unit tests.

    It speaks docs/protocol.md with paho from the test and replies as
    scripted, so the refapi tests do not depend on the agent. The end-to-end
    tests run the real agent. It answers RPCs
    with `rpc_handler`, echoes terminal input back as x-data, reports
    resizes as text output, ends a session on x-stop, and exits with status
    N after the input "exit N".
    """

    def __init__(self, broker_port, router_id=None):
        self.router_id = router_id or new_router_id()
        self.prefix = "spotfi/router/%s/" % self.router_id
        self.broker_port = broker_port
        self.received = []  # (topic, message dict) in arrival order
        self.rpc_handler = self.answer_success
        self.use_response_topic = True
        self.echo_terminal = True
        self._condition = threading.Condition()
        self._seq = {}  # session id -> next output seq
        self._terminal_topics = {}  # session id -> responseTopic of its x-start
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                   client_id="router-" + self.router_id)
        self._client.on_message = self._on_message

    def connect(self):
        self._client.connect("127.0.0.1", self.broker_port)
        self._client.loop_start()
        result, mid = self._client.subscribe([(self.prefix + "rpc/request", 1),
                                              (self.prefix + "x/in", 0)])
        assert result == mqtt.MQTT_ERR_SUCCESS
        # A round trip through the broker proves that the SUBACK came first.
        self._client.publish(self.prefix + "probe", b"", qos=1).wait_for_publish(WAIT)
        return self

    def close(self):
        """Delete the retained status this router left on the broker and disconnect."""
        self._client.publish(self.prefix + "status", b"", qos=1,
                             retain=True).wait_for_publish(WAIT)
        self._client.disconnect()
        self._client.loop_stop()

    def publish(self, suffix, payload, qos=0, retain=False):
        if isinstance(payload, (dict, list)):
            payload = json.dumps(payload)
        self._client.publish(self.prefix + suffix, payload, qos=qos,
                             retain=retain).wait_for_publish(WAIT)

    def online(self):
        self.publish("status", "ONLINE", qos=1, retain=True)

    def offline(self):
        self.publish("status", "OFFLINE", qos=1, retain=True)

    def send_metrics(self, metrics=None):
        self.publish("metrics", {"type": "metrics", "metrics": metrics or {
            "uptime": "86400", "cpuLoad": 3.12, "totalMemory": 129499136,
            "freeMemory": 73539584, "activeUsers": 4}})

    # RPC

    @staticmethod
    def answer_success(request):
        return {"status": "success", "result": {"echo": request.get("args"),
                                                "path": request["path"],
                                                "method": request["method"]}}

    def _answer_rpc(self, request):
        reply = self.rpc_handler(request)
        if reply is None:
            return
        message = {"type": "rpc-result", "id": request["id"]}
        message.update(reply)
        topic = request.get("responseTopic") if self.use_response_topic else None
        self._client.publish(topic or self.prefix + "rpc/response", json.dumps(message), qos=1)

    # Terminal

    def send_output(self, session_id, data, seq, topic=None):
        """Publish one x-data message with an explicit seq (for ordering tests)."""
        message = {"type": "x-data", "sessionId": session_id, "seq": seq,
                   "data": base64.b64encode(data).decode()}
        self._client.publish(topic or self.prefix + "x/out", json.dumps(message), qos=0)

    def send_terminal(self, message, topic=None):
        self._client.publish(topic or self.prefix + "x/out", json.dumps(message), qos=0)

    def _terminal_output(self, request, data):
        session_id = request["sessionId"]
        seq = self._seq.get(session_id, 0)
        self._seq[session_id] = seq + 1
        self.send_output(session_id, data, seq, self._terminal_topics.get(session_id))

    def _handle_terminal(self, request):
        kind = request.get("type")
        session_id = request.get("sessionId")
        if kind == "x-start":
            self._terminal_topics[session_id] = request.get("responseTopic")
            self.send_terminal({"type": "x-started", "sessionId": session_id, "pid": 4242,
                                "cols": request.get("cols", 80), "rows": request.get("rows", 24)},
                               request.get("responseTopic"))
        elif kind == "x-data":
            data = base64.b64decode(request["data"])
            self._terminal_output(request, data)
            if data.startswith(b"exit "):
                self.send_terminal({"type": "x-exit", "sessionId": session_id, "reason": "exit",
                                    "exitCode": int(data.split()[1])},
                                   self._terminal_topics.get(session_id))
        elif kind == "x-resize":
            self._terminal_output(request, b"resized %dx%d" % (request["cols"], request["rows"]))
        elif kind == "x-stop":
            self.send_terminal({"type": "x-exit", "sessionId": session_id, "reason": "stopped"},
                               self._terminal_topics.get(session_id))

    def _on_message(self, client, userdata, message):
        try:
            request = json.loads(message.payload)
        except ValueError:
            request = {"invalid": message.payload}
        with self._condition:
            self.received.append((message.topic, request))
            self._condition.notify_all()
        if message.topic.endswith("/rpc/request"):
            self._answer_rpc(request)
        elif message.topic.endswith("/x/in") and self.echo_terminal:
            self._handle_terminal(request)

    def wait_for_message(self, predicate, timeout=WAIT):
        """Return the first received (topic, message) matching `predicate`."""
        deadline = time.monotonic() + timeout
        with self._condition:
            while True:
                for item in self.received:
                    if predicate(*item):
                        return item
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError("router %s received no matching message; received: %r"
                                         % (self.router_id, self.received))
                self._condition.wait(remaining)


class PostgresCluster:
    """A throwaway PostgreSQL cluster from Debian's postgresql package on 127.0.0.1."""

    def __init__(self, bindir):
        self.bindir = bindir
        self.port = localservices.free_port()
        self.datadir = None
        self._run_as = []

    @staticmethod
    def find_bindir():
        """Return the newest /usr/lib/postgresql/*/bin that has initdb and pg_ctl, or None."""
        root = "/usr/lib/postgresql"
        if not os.path.isdir(root):
            return None
        versions = sorted(os.listdir(root), key=lambda name: [int(part) if part.isdigit()
                                                             else 0 for part in name.split(".")])
        for version in reversed(versions):
            bindir = os.path.join(root, version, "bin")
            if all(os.access(os.path.join(bindir, tool), os.X_OK)
                   for tool in ("initdb", "pg_ctl")):
                return bindir
        return None

    def start(self):
        # PostgreSQL refuses to run as root, so root runs it as the package's
        # `postgres` user in a directory that user owns, outside pytest's
        # root-only temporary tree.
        self.datadir = tempfile.mkdtemp(prefix="spotfi-refapi-pg-")
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.datadir, user.pw_uid, user.pw_gid)
            self._run_as = ["runuser", "-u", "postgres", "--"]
        data = os.path.join(self.datadir, "data")
        self._tool("initdb", "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8",
                   "--no-sync")
        options = "-c listen_addresses=127.0.0.1 -p %d -k %s -c fsync=off" % (self.port,
                                                                             self.datadir)
        self._tool("pg_ctl", "-D", data, "-o", options, "-l",
                   os.path.join(self.datadir, "postgres.log"), "-w", "-t", "30", "start")
        return self

    def stop(self):
        if self.datadir is None:
            return
        data = os.path.join(self.datadir, "data")
        if os.path.exists(os.path.join(data, "postmaster.pid")):
            self._tool("pg_ctl", "-D", data, "-m", "fast", "-w", "stop")
        shutil.rmtree(self.datadir, ignore_errors=True)
        self.datadir = None

    def url(self, database="postgres"):
        return "postgresql://postgres@127.0.0.1:%d/%s" % (self.port, database)

    def create_database(self):
        """Create an empty database and return its URL."""
        import psycopg

        name = "refapi_%s" % uuid.uuid4().hex[:12]
        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute("CREATE DATABASE %s" % name)
        return self.url(name)

    def _tool(self, name, *args):
        argv = self._run_as + [os.path.join(self.bindir, name)] + list(args)
        completed = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, timeout=60)
        if completed.returncode != 0:
            raise RuntimeError("%s failed with exit status %d: %s"
                               % (name, completed.returncode,
                                  completed.stdout.decode(errors="replace")[-2000:]))
