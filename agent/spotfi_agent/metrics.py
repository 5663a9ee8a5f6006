"""Router metrics in the Go bridge's heartbeat format, from ubus or /proc.

The Go bridge read `ubus call system info` and `ubus call uspot client_list`.
The agent does the same when ubus is installed and falls back to /proc for
every figure ubus did not give, so a router without ubus still reports true
numbers. Collectors run as child processes on the loop with a timeout, so a
hung ubus never delays the MQTT connection.
"""

from spotfi_agent import jsoncodec
from spotfi_agent import procrun
from spotfi_agent.compat import find_executable, read_text
from spotfi_agent.log import get_logger

log = get_logger(__name__)

COLLECTOR_TIMEOUT = 5.0


def read_proc(proc_dir):
    """Return the figures /proc gives: uptime, load averages, memory and interfaces."""
    figures = {}
    uptime = read_text(proc_dir + "/uptime")
    if uptime:
        try:
            figures["uptime"] = int(float(uptime.split()[0]))
        except (ValueError, IndexError):
            log.warning("cannot parse %s/uptime: %r", proc_dir, uptime[:40])
    loadavg = read_text(proc_dir + "/loadavg")
    if loadavg:
        try:
            figures["load"] = [float(value) for value in loadavg.split()[:3]]
        except ValueError:
            log.warning("cannot parse %s/loadavg: %r", proc_dir, loadavg[:40])
    meminfo = read_text(proc_dir + "/meminfo")
    if meminfo:
        memory = {}
        for line in meminfo.splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] in ("MemTotal:", "MemFree:", "MemAvailable:"):
                try:
                    memory[parts[0][:-1]] = int(parts[1]) * 1024
                except ValueError:
                    pass
        figures["memory"] = memory
    netdev = read_text(proc_dir + "/net/dev")
    if netdev:
        figures["interfaces"] = parse_netdev(netdev)
    return figures


def parse_netdev(text):
    """Return {interface: {"rxBytes", "txBytes"}} from /proc/net/dev, loopback left out."""
    interfaces = {}
    for line in text.splitlines()[2:]:
        if ":" not in line:
            continue
        name, counters = line.split(":", 1)
        name = name.strip()
        values = counters.split()
        if name == "lo" or len(values) < 9:
            continue
        try:
            interfaces[name] = {"rxBytes": int(values[0]), "txBytes": int(values[8])}
        except ValueError:
            continue
    return interfaces


def count_uspot_clients(reply):
    """Count clients in `ubus call uspot client_list` output.

    uspot returns {interface: {mac: {...}}}. A flat list or {mac: {...}} is
    counted as well, because the shape has changed between uspot versions.
    """
    if isinstance(reply, list):
        return len(reply)
    if not isinstance(reply, dict):
        return 0
    total = 0
    for value in reply.values():
        if isinstance(value, dict) and value and all(isinstance(item, dict) for item in value.values()):
            total += len(value)
        elif isinstance(value, list):
            total += len(value)
        else:
            total += 1
    return total


def build_metrics(proc, system_info, clients, extras):
    """Return the heartbeat payload from /proc figures and, when given, ubus replies."""
    memory = proc.get("memory", {})
    load = proc.get("load", [0.0, 0.0, 0.0])
    uptime = proc.get("uptime", 0)
    cpu_load = load[0] * 100.0
    total = memory.get("MemTotal", 0)
    free = memory.get("MemFree", 0)
    source = "proc"

    if isinstance(system_info, dict):
        source = "ubus"
        if isinstance(system_info.get("uptime"), int):
            uptime = system_info["uptime"]
        ubus_load = system_info.get("load")
        if isinstance(ubus_load, list) and len(ubus_load) == 3 and all(isinstance(v, int) for v in ubus_load):
            # ubus reports load averages as fixed point with 65536 meaning 1.0;
            # the Go bridge divided by 65535, kept for identical figures.
            cpu_load = ubus_load[0] / 65535.0 * 100.0
            load = [value / 65536.0 for value in ubus_load]
        ubus_memory = system_info.get("memory")
        if isinstance(ubus_memory, dict):
            total = ubus_memory.get("total", total)
            free = ubus_memory.get("free", free)

    metrics = {
        "uptime": str(int(uptime)),
        "cpuLoad": round(cpu_load, 2),
        "totalMemory": int(total),
        "freeMemory": int(free),
        "activeUsers": count_uspot_clients(clients) if clients is not None else 0,
        "load": [round(value, 2) for value in load],
        "source": source,
    }
    if "MemAvailable" in memory:
        metrics["availableMemory"] = memory["MemAvailable"]
    if "interfaces" in proc:
        metrics["interfaces"] = proc["interfaces"]
    metrics.update(extras)
    return {"type": "metrics", "metrics": metrics}


class MetricsCollector:
    """Collects one heartbeat at a time; collect(callback) calls callback(payload dict)."""

    def __init__(self, loop, proc_dir, ubus_command, router_id):
        self.loop = loop
        self.proc_dir = proc_dir
        self.ubus_command = ubus_command
        self.router_id = router_id
        self._busy = False
        self._warned_no_ubus = False
        self._warned_no_proc = False
        self._warned_no_spawn = False

    def _read_proc(self):
        figures = read_proc(self.proc_dir)
        if "uptime" not in figures and not self._warned_no_proc:
            log.warning("router %s: cannot read %s/uptime, so metrics from /proc are zero; "
                        "check that procfs is mounted there", self.router_id, self.proc_dir)
            self._warned_no_proc = True
        return figures

    def collect(self, callback, extras):
        if self._busy:
            log.warning("router %s: skipped a heartbeat: the previous collection is still running",
                        self.router_id)
            return
        ubus = find_executable(self.ubus_command)
        if ubus is None:
            if not self._warned_no_ubus:
                log.info("router %s: ubus (%s) not found, metrics come from %s",
                         self.router_id, self.ubus_command, self.proc_dir)
                self._warned_no_ubus = True
            callback(build_metrics(self._read_proc(), None, None, extras))
            return
        cannot_spawn = procrun.unavailable_reason()
        if cannot_spawn is not None:
            if not self._warned_no_spawn:
                log.warning("router %s: metrics come from %s without ubus: %s",
                            self.router_id, self.proc_dir, cannot_spawn)
                self._warned_no_spawn = True
            callback(build_metrics(self._read_proc(), None, None, extras))
            return
        self._busy = True
        replies = {}

        def finished(name, result):
            replies[name] = _parse_reply(result, name, self.router_id)
            if len(replies) == 2:
                self._busy = False
                callback(build_metrics(self._read_proc(), replies["system"],
                                       replies["uspot"], extras))

        procrun.run(self.loop, [ubus, "call", "system", "info"], COLLECTOR_TIMEOUT,
                    lambda result: finished("system", result), 65536)
        procrun.run(self.loop, [ubus, "call", "uspot", "client_list"], COLLECTOR_TIMEOUT,
                    lambda result: finished("uspot", result), 1024 * 1024)


def _parse_reply(result, name, router_id):
    if result.status != 0:
        if name == "system" or result.status not in (4,):
            log.warning("router %s: metrics collector `ubus call %s` failed: %s", router_id, name,
                        "timed out" if result.timed_out else (result.error or "exit status %s: %s" % (
                            result.status, result.stderr.decode("utf-8", "replace").strip()[:200])))
        return None
    try:
        return jsoncodec.loads(result.stdout.decode("utf-8"))
    except ValueError:
        log.warning("router %s: `ubus call %s` printed invalid JSON", router_id, name)
        return None
