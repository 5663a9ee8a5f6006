"""Command-line tests: `python -m spotfi_refapi` and the xclient terminal client."""

import fcntl
import os
import pty
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import time

import pytest

import localservices
from refapi_testing import WAIT, http_json, new_router_id, wait_until
from spotfi_refapi import config
from spotfi_refapi.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def child_env(**extra):
    env = {key: value for key, value in os.environ.items()
           if key not in ("COLUMNS", "LINES") and not key.startswith(("MQTT_", "REDIS_",
                                                                       "DATABASE_"))}
    env["PYTHONPATH"] = os.pathsep.join(os.path.join(ROOT, folder)
                                        for folder in ("agent", "refapi", "tools"))
    env.update(extra)
    return env


def online_router(scripted_router, redis_client):
    router = scripted_router()
    router.online()
    wait_until(lambda: redis_client.exists("router:online:" + router.router_id),
               message="router %s online" % router.router_id)
    return router


@pytest.mark.parametrize("argv, env, expected", [
    (["--mqtt-broker-url", "ftp://host"], {}, "invalid --mqtt-broker-url 'ftp://host'"),
    ([], {"MQTT_BROKER_URL": "mqtt://"}, "invalid MQTT_BROKER_URL 'mqtt://'"),
    ([], {"MQTT_BROKER_URL": "mqtt://h:99999"}, "invalid MQTT_BROKER_URL"),
    ([], {"DATABASE_URL": "mysql://h/db"}, "the scheme must be sqlite or postgresql"),
    ([], {"DATABASE_URL": "sqlite:///:memory:"}, "in-memory database is not supported"),
    ([], {"REDIS_URL": "http://h"}, "invalid REDIS_URL"),
    (["--port", "0"], {}, "invalid --port '0'"),
    ([], {"PORT": "http"}, "invalid PORT 'http'"),
    (["--instance-id", "a/b"], {}, "invalid --instance-id 'a/b'"),
    (["--heartbeat-ttl", "59"], {}, "must be at least 60"),
    (["--log-level", "loud"], {}, "invalid --log-level 'loud'"),
    (["--unknown"], {}, "unrecognized arguments: --unknown"),
])
def test_settings_invalid_values(argv, env, expected):
    with pytest.raises(ConfigError) as raised:
        config.parse_settings(argv, env)
    assert expected in str(raised.value)


def test_settings_flags_override_environment():
    settings = config.parse_settings(
        ["--port", "9000", "--mqtt-broker-url", "mqtts://user:p%40ss@broker.example:8884"],
        {"PORT": "8000", "MQTT_BROKER_URL": "mqtt://ignored", "INSTANCE_ID": "api-1",
         "DATABASE_URL": "sqlite:////var/lib/spotfi/api.db", "METRICS_INTERVAL": "60"})
    assert settings.port == 9000
    assert settings.broker.tls is True
    assert settings.broker.host == "broker.example"
    assert settings.broker.port == 8884
    assert settings.broker.username == "user"
    assert settings.broker.password == "p@ss"
    assert "p%40ss" not in settings.broker.url
    assert settings.instance_id == "api-1"
    assert settings.database.dialect == "sqlite"
    assert settings.database.target == "/var/lib/spotfi/api.db"
    assert settings.heartbeat_ttl == 180


def test_settings_defaults():
    settings = config.parse_settings([], {})
    assert settings.host == "127.0.0.1"
    assert settings.port == 8080
    assert settings.broker.port == 1883
    assert settings.broker.tls is False
    assert settings.database.target == "spotfi-refapi.db"
    assert settings.heartbeat_ttl == 90
    assert len(settings.instance_id) == 8
    assert config.parse_settings([], {}).instance_id != settings.instance_id


def test_main_bad_config_exits_2():
    completed = subprocess.run([sys.executable, "-m", "spotfi_refapi"], cwd=ROOT,
                               env=child_env(MQTT_BROKER_URL="ftp://x"), capture_output=True,
                               text=True, timeout=60)
    assert completed.returncode == 2
    assert completed.stderr.splitlines() == [
        "spotfi-refapi: error: invalid MQTT_BROKER_URL 'ftp://x': the scheme must be one of "
        "mqtt, mqtts, tcp, ssl"]


def test_main_unopenable_database_exits_1(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "spotfi_refapi", "--database-url",
         "sqlite:///%s/missing/x.db" % tmp_path, "--port", str(localservices.free_port())],
        cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=60)
    assert completed.returncode == 1
    assert "cannot start: could not create the schema" in completed.stderr


def test_main_port_in_use_exits_1(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        completed = subprocess.run(
            [sys.executable, "-m", "spotfi_refapi", "--port", str(port), "--database-url",
             "sqlite:///%s" % (tmp_path / "api.db"), "--mqtt-broker-url",
             "mqtt://127.0.0.1:%d" % localservices.free_port()],
            cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=60)
    assert completed.returncode == 1
    assert "cannot listen on 127.0.0.1:%d" % port in completed.stderr


def test_main_serves_and_stops_on_sigterm(mosquitto, redis_server, tmp_path):
    port = localservices.free_port()
    env = child_env(MQTT_BROKER_URL="mqtt://127.0.0.1:%d" % mosquitto.port,
                    REDIS_URL="redis://127.0.0.1:%d/0" % redis_server.port,
                    DATABASE_URL="sqlite:///%s" % (tmp_path / "api.db"), PORT=str(port),
                    INSTANCE_ID="cli-test")
    log_path = tmp_path / "refapi.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "spotfi_refapi"], cwd=ROOT, env=env,
                                   stdout=log, stderr=subprocess.STDOUT)
    try:
        def healthy():
            try:
                return http_json("GET", "http://127.0.0.1:%d/health" % port, timeout=2)
            except OSError:
                return None

        status, body = wait_until(lambda: (healthy() or (0, None))[0] == 200 and healthy(),
                                  timeout=30, message="GET /health")
        assert body["instance"] == "cli-test"
        process.send_signal(signal.SIGTERM)
        assert process.wait(WAIT) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(WAIT)
    text = log_path.read_text()
    assert "listening on http://127.0.0.1:%d" % port in text
    assert "stopped" in text


def run_xclient(args, timeout=60):
    return subprocess.run([sys.executable, "-m", "spotfi_refapi.xclient"] + args, cwd=ROOT,
                          env=child_env(), capture_output=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def test_xclient_command_prints_output(start_refapi, scripted_router, redis_client):
    api = start_refapi()
    router = online_router(scripted_router, redis_client)
    completed = run_xclient(["--url", api.url, "--command", "echo hi", "--idle", "1",
                             router.router_id])
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout == b"echo hi\n"
    _, start = router.wait_for_message(lambda t, m: m.get("type") == "x-start")
    assert start["cols"] == 80
    router.wait_for_message(lambda t, m: m.get("type") == "x-stop")


def test_xclient_command_exit_status(start_refapi, scripted_router, redis_client):
    api = start_refapi()
    router = online_router(scripted_router, redis_client)
    completed = run_xclient(["--url", api.url, "--command", "exit 7", router.router_id])
    assert completed.returncode == 7
    assert completed.stdout == b"exit 7\n"


def test_xclient_unknown_router_error(start_refapi):
    api = start_refapi()
    router_id = new_router_id("unknown")
    completed = run_xclient(["--url", api.url, "--command", "true", router_id])
    assert completed.returncode == 1
    assert b"(HTTP 404): router %s is unknown" % router_id.encode() in completed.stderr


def test_xclient_bad_url_exits_2():
    completed = run_xclient(["--url", "ftp://x", "--command", "true", "r1"])
    assert completed.returncode == 2
    assert b"invalid --url 'ftp://x'" in completed.stderr


def read_until(fd, expected, timeout=WAIT):
    """Read from `fd` until `expected` appears, and return everything read."""
    data = b""
    deadline = time.monotonic() + timeout
    while expected not in data:
        remaining = deadline - time.monotonic()
        assert remaining > 0, "timed out waiting for %r; read %r" % (expected, data)
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            chunk = os.read(fd, 4096)
            assert chunk, "end of output while waiting for %r; read %r" % (expected, data)
            data += chunk
    return data


def test_xclient_interactive_tty(start_refapi, scripted_router, redis_client):
    api = start_refapi()
    router = online_router(scripted_router, redis_client)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 90, 0, 0))
    process = subprocess.Popen([sys.executable, "-m", "spotfi_refapi.xclient", "--url", api.url,
                                router.router_id], cwd=ROOT, env=child_env(), stdin=slave,
                               stdout=slave, stderr=subprocess.PIPE, start_new_session=True)
    os.close(slave)
    try:
        _, start = router.wait_for_message(lambda t, m: m.get("type") == "x-start")
        assert (start["cols"], start["rows"]) == (90, 30)
        # Input typed before raw mode would be line-buffered by the tty.
        wait_until(lambda: not termios.tcgetattr(master)[3] & termios.ICANON,
                   message="raw mode")
        os.write(master, b"ls\r")
        assert b"ls\r" in read_until(master, b"ls\r")

        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 101, 0, 0))
        process.send_signal(signal.SIGWINCH)
        assert b"resized 101x33" in read_until(master, b"resized 101x33")

        os.write(master, b"\x1d")
        assert process.wait(WAIT) == 0
        router.wait_for_message(lambda t, m: m.get("type") == "x-stop")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(WAIT)
        process.stderr.close()
        os.close(master)
