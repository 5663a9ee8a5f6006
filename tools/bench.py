"""`make bench`: the agent's memory, start-up, RPC latency and terminal throughput.

Every figure comes from one run on this machine against a local mosquitto,
and each is printed beside a baseline measured in the same run (the bare
interpreter, the design target), because absolute times vary between runs.
Writes the table to the file given with --output.
"""

import argparse
import base64
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import paho.mqtt.client as paho

import localservices

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UBUS_TEST_DOUBLE = os.path.join(ROOT, "tests", "bin", "ubus_test_double")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


class Observer:
    """A paho client that records messages and can wait for one matching a predicate."""

    def __init__(self, port, topics):
        self.messages = []
        self.condition = threading.Condition()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="bench-%d" % os.getpid())
        self.client.on_message = self._on_message
        connected = threading.Event()
        self.client.on_connect = lambda *args: connected.set()
        self.client.connect("127.0.0.1", port, 60)
        # paho leaves Nagle's algorithm on, which holds each request behind the
        # delayed ACK of the previous reply and measures 40 ms of TCP, not the agent.
        self.client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.client.loop_start()
        connected.wait(10)
        for topic in topics:
            self.client.subscribe(topic, 1)
        time.sleep(0.2)

    def _on_message(self, client, userdata, message):
        with self.condition:
            self.messages.append((time.perf_counter(), message.topic, bytes(message.payload)))
            self.condition.notify_all()

    def wait(self, predicate, timeout):
        deadline = time.monotonic() + timeout
        with self.condition:
            while True:
                for entry in self.messages:
                    if predicate(entry[1], entry[2]):
                        return entry
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise RuntimeError("bench: timed out waiting for a message")
                self.condition.wait(remaining)

    def clear(self):
        with self.condition:
            self.messages = []

    def close(self):
        self.client.loop_stop()
        self.client.disconnect()


def write_root(root, router_id, port, transport):
    os.makedirs(os.path.join(root, "etc", "config"), exist_ok=True)
    os.makedirs(os.path.join(root, "etc", "spotfi", "handlers.d"), exist_ok=True)
    if not os.path.exists(os.path.join(root, "proc")):
        os.symlink("/proc", os.path.join(root, "proc"))
    with open(os.path.join(root, "etc", "config", "spotfi"), "w") as handle:
        handle.write("config agent 'main'\n\toption token 'bench'\n\toption router_id '%s'\n"
                     "\tlist broker 'mqtt://127.0.0.1:%d'\n\toption transport '%s'\n"
                     "\toption tunnel_shell '/bin/sh'\n\toption log_level 'warning'\n"
                     "\toption rpc_max_concurrent '8'\n" % (router_id, port, transport))


def agent_environment(workdir):
    bin_dir = os.path.join(workdir, "bin")
    os.makedirs(bin_dir, exist_ok=True)
    if not os.path.exists(os.path.join(bin_dir, "ubus")):
        os.symlink(UBUS_TEST_DOUBLE, os.path.join(bin_dir, "ubus"))
    env = {key: value for key, value in os.environ.items() if not key.startswith("SPOTFI_")}
    env["PYTHONPATH"] = os.path.join(ROOT, "agent")
    env["PATH"] = bin_dir + ":/usr/bin:/bin"
    return env


def start_agent(interpreter, root, env):
    return subprocess.Popen(interpreter + ["-m", "spotfi_agent", "--root", root, "run"], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def stop(process):
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def measure_bare_interpreter(interpreter):
    process = subprocess.Popen(interpreter + ["-c", "import time\ntime.sleep(3)"])
    time.sleep(1.0)
    rss = rss_kib(process.pid)
    process.wait()
    return rss


def measure_start_to_online(interpreter, port, workdir, transport, runs=5):
    samples = []
    for run in range(runs):
        router_id = "bench-start-%s-%d" % (transport, run)
        root = os.path.join(workdir, router_id)
        write_root(root, router_id, port, transport)
        observer = Observer(port, ["spotfi/router/%s/status" % router_id])
        started = time.perf_counter()
        process = start_agent(interpreter, root, agent_environment(workdir))
        try:
            arrived, _, _ = observer.wait(lambda topic, payload: payload == b"ONLINE", 20)
            samples.append((arrived - started) * 1000.0)
        finally:
            stop(process)
            observer.close()
    return statistics.median(samples)


def measure_idle(interpreter, port, workdir, transport, seconds):
    router_id = "bench-idle-%s" % transport
    root = os.path.join(workdir, router_id)
    write_root(root, router_id, port, transport)
    observer = Observer(port, ["spotfi/router/%s/status" % router_id])
    process = start_agent(interpreter, root, agent_environment(workdir))
    try:
        observer.wait(lambda topic, payload: payload == b"ONLINE", 20)
        cpu_start = cpu_seconds(process.pid)
        time.sleep(seconds)
        cpu_per_minute = (cpu_seconds(process.pid) - cpu_start) * 60.0 / seconds * 1000.0
        return rss_kib(process.pid), cpu_per_minute
    finally:
        stop(process)
        observer.close()


def measure_rpc(interpreter, port, workdir, transport, calls):
    router_id = "bench-rpc-%s" % transport
    root = os.path.join(workdir, router_id)
    write_root(root, router_id, port, transport)
    prefix = "spotfi/router/%s/" % router_id
    observer = Observer(port, [prefix + "status", prefix + "rpc/response"])
    process = start_agent(interpreter, root, agent_environment(workdir))
    results = {}
    try:
        observer.wait(lambda topic, payload: payload == b"ONLINE", 20)
        for label, path, method in (("agent method", "spotfi.agent", "ping"),
                                    ("ubus test double", "system", "info")):
            samples = []
            for index in range(calls):
                request_id = "%s-%d" % (method, index)
                needle = ('"id": "%s"' % request_id).encode()
                sent = time.perf_counter()
                observer.client.publish(prefix + "rpc/request", json.dumps(
                    {"type": "rpc", "id": request_id, "path": path, "method": method, "args": {}}), 1)
                arrived, _, _ = observer.wait(
                    lambda topic, payload: topic.endswith("rpc/response") and needle in payload, 10)
                samples.append((arrived - sent) * 1000.0)
            observer.clear()
            samples.sort()
            results[label] = (samples[len(samples) // 2], samples[int(len(samples) * 0.99) - 1])
    finally:
        stop(process)
        observer.close()
    return results


def measure_terminal(interpreter, port, workdir, transport, size):
    router_id = "bench-tty-%s" % transport
    root = os.path.join(workdir, router_id)
    write_root(root, router_id, port, transport)
    prefix = "spotfi/router/%s/" % router_id
    observer = Observer(port, [prefix + "status", prefix + "x/out"])
    process = start_agent(interpreter, root, agent_environment(workdir))
    try:
        observer.wait(lambda topic, payload: payload == b"ONLINE", 20)
        session = "bench"
        observer.client.publish(prefix + "x/in", json.dumps({"type": "x-start", "sessionId": session}), 1)
        observer.wait(lambda topic, payload: b'"x-started"' in payload, 10)
        lines = size // 64
        script = ("stty -echo; i=0; while [ $i -lt %d ]; do printf '%%063d\\n' $i; i=$((i+1)); done"
                  " > /tmp/spotfi-bench-%d.txt; echo READY\n" % (lines, os.getpid()))
        send = lambda data: observer.client.publish(prefix + "x/in", json.dumps(
            {"type": "x-data", "sessionId": session, "data": base64.b64encode(data).decode()}), 1)
        send(script.encode())
        observer.wait(lambda topic, payload: b"x-data" in payload and b"UkVBRFk" in payload, 120)
        observer.clear()
        started = time.perf_counter()
        send(b"cat /tmp/spotfi-bench-%d.txt; echo DONE-DONE\n" % os.getpid())
        chunks = []

        def finished(topic, payload):
            return b"DONE-DONE" in base64.b64decode(json.loads(payload).get("data", "")) if b"x-data" in payload else False
        arrived, _, _ = observer.wait(finished, 120)
        elapsed = arrived - started
        sequences = []
        for _, topic, payload in observer.messages:
            message = json.loads(payload)
            if message.get("type") == "x-data":
                sequences.append(message["seq"])
                chunks.append(base64.b64decode(message["data"]))
        output = b"".join(chunks).replace(b"\r\n", b"\n")
        numbers = [int(line) for line in output.split(b"\n") if len(line) == 63 and line.isdigit()]
        reordered = sum(1 for a, b in zip(sequences, sequences[1:]) if b != a + 1)
        in_order = numbers == list(range(lines))
        return len(output) / elapsed / 1e6, reordered, in_order
    finally:
        stop(process)
        observer.close()
        try:
            os.remove("/tmp/spotfi-bench-%d.txt" % os.getpid())
        except OSError:
            pass


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", help="Markdown file to write the figures to")
    parser.add_argument("--idle-seconds", type=float, default=60.0, help="idle period for RSS and CPU, in s")
    parser.add_argument("--rpc-calls", type=int, default=500, help="RPC calls per handler")
    parser.add_argument("--terminal-bytes", type=int, default=5 * 1000 * 1000)
    options = parser.parse_args()

    workdir = tempfile.mkdtemp(prefix="spotfi-bench-")
    broker = localservices.mosquitto(os.path.join(workdir, "mosquitto")).start()
    interpreter = [sys.executable]
    rows = []
    try:
        bare = measure_bare_interpreter(interpreter)
        for transport in ("native", "paho"):
            rss, cpu = measure_idle(interpreter, broker.port, workdir, transport, options.idle_seconds)
            online = measure_start_to_online(interpreter, broker.port, workdir, transport)
            rpc = measure_rpc(interpreter, broker.port, workdir, transport, options.rpc_calls)
            throughput, reordered, in_order = measure_terminal(interpreter, broker.port, workdir,
                                                               transport, options.terminal_bytes)
            rows.append((transport, rss, cpu, online, rpc, throughput, reordered, in_order))
    finally:
        broker.stop()

    lines = render(bare, rows, options)
    print("\n".join(lines))
    if options.output:
        with open(options.output, "w") as handle:
            handle.write("\n".join(lines) + "\n")


def render(bare, rows, options):
    lines = [
        "# Benchmarks",
        "",
        "Written by `make bench` (tools/bench.py) on %s, %s, %d cores, Python %s, against a local "
        "mosquitto. Figures vary between runs on a shared machine; compare the figures of one run "
        "with each other." % (time.strftime("%Y-%m-%d"), platform.machine(), os.cpu_count(),
                               platform.python_version()),
        "",
        "Bare interpreter RSS (`python3 -c 'import time; time.sleep(3)'`): %.1f MB." % (bare / 1024.0),
        "",
        "| figure | native transport | paho transport | target |",
        "|---|---|---|---|",
    ]
    native, paho_row = rows[0], rows[1]

    def cell(row, index):
        return row[index]

    lines.append("| idle RSS after %.0f s | %.1f MB (+%.1f MB) | %.1f MB (+%.1f MB) | within 3.5 MB of the bare interpreter |"
                 % (options.idle_seconds, native[1] / 1024.0, (native[1] - bare) / 1024.0,
                    paho_row[1] / 1024.0, (paho_row[1] - bare) / 1024.0))
    lines.append("| idle CPU | %.1f ms/min | %.1f ms/min | under 10 ms per minute |" % (native[2], paho_row[2]))
    lines.append("| start to ONLINE (median of 5) | %.0f ms | %.0f ms | under 150 ms |" % (native[3], paho_row[3]))
    for label, target in (("agent method", "p50 under 1 ms"), ("ubus test double", "p50 under 2 ms")):
        lines.append("| RPC %s, p50 / p99 over %d calls | %.2f / %.2f ms | %.2f / %.2f ms | %s |"
                     % (label, options.rpc_calls, cell(native, 4)[label][0], cell(native, 4)[label][1],
                        cell(paho_row, 4)[label][0], cell(paho_row, 4)[label][1], target))
    lines.append("| terminal, %.0f MB of output | %.1f MB/s, %d reordered, %s | %.1f MB/s, %d reordered, %s | at least 15 MB/s, none reordered |"
                 % (options.terminal_bytes / 1e6, native[5], native[6], "complete" if native[7] else "INCOMPLETE",
                    paho_row[5], paho_row[6], "complete" if paho_row[7] else "INCOMPLETE"))
    return lines


if __name__ == "__main__":
    main()
