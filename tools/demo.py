"""`make demo`: mosquitto, redis-server, the reference API and one agent on 127.0.0.1.

Prints what the router reported and the result of one RPC, then keeps
everything running until Ctrl-C, which stops each process this script started.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import localservices

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROUTER_ID = "demo-router"


def request(base_url, method, path, body=None, timeout=40):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base_url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def wait_for(description, predicate, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except OSError:
            value = None
        if value:
            return value
        time.sleep(0.2)
    raise SystemExit("demo: timed out after %d s waiting for %s" % (timeout, description))


def start(argv, env, log_path):
    log = open(log_path, "ab")
    try:
        return subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        log.close()


def write_router_root(root, broker_port):
    os.makedirs(os.path.join(root, "etc", "config"))
    os.makedirs(os.path.join(root, "etc", "spotfi", "handlers.d"))
    os.symlink("/proc", os.path.join(root, "proc"))
    with open(os.path.join(root, "etc", "config", "spotfi"), "w") as handle:
        handle.write("config agent 'main'\n"
                     "\toption enabled '1'\n"
                     "\toption token 'demo-token'\n"
                     "\toption router_id '%s'\n"
                     "\tlist broker 'mqtt://127.0.0.1:%d'\n"
                     "\toption metrics_interval '10'\n"
                     "\toption tunnel_shell '/bin/sh'\n" % (ROUTER_ID, broker_port))


def main():
    workdir = tempfile.mkdtemp(prefix="spotfi-demo-")
    services = []
    processes = []
    stopping = []
    failed = []

    def stop_all(*_):
        if stopping:
            return
        stopping.append(True)
        print("\nStopping everything the demo started...")
        for process in reversed(processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(5)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(5)
        for service in reversed(services):
            service.stop()
        if failed:
            print("Stopped. The logs are kept in %s" % workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
            print("Stopped.")

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        broker = localservices.mosquitto(os.path.join(workdir, "mosquitto")).start()
        services.append(broker)
        redis = localservices.redis(os.path.join(workdir, "redis")).start()
        services.append(redis)
        api_port = localservices.free_port()
        api_url = "http://127.0.0.1:%d" % api_port
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(os.path.join(ROOT, name) for name in ("agent", "refapi", "tools"))
        env.update({
            "MQTT_BROKER_URL": "mqtt://127.0.0.1:%d" % broker.port,
            "REDIS_URL": "redis://127.0.0.1:%d/0" % redis.port,
            "DATABASE_URL": "sqlite:///" + os.path.join(workdir, "refapi.db"),
            "HOST": "127.0.0.1",
            "PORT": str(api_port),
            "INSTANCE_ID": "demo",
        })
        processes.append(start([sys.executable, "-m", "spotfi_refapi"], env,
                               os.path.join(workdir, "refapi.log")))
        wait_for("the reference API", lambda: request(api_url, "GET", "/health")[0] == 200, 30)

        root = os.path.join(workdir, "router")
        write_router_root(root, broker.port)
        processes.append(start([sys.executable, "-m", "spotfi_agent", "--root", root, "run"], env,
                               os.path.join(workdir, "agent.log")))

        print("mosquitto     127.0.0.1:%d" % broker.port)
        print("redis-server  127.0.0.1:%d" % redis.port)
        print("reference API %s" % api_url)
        print("agent         router id %s, log %s" % (ROUTER_ID, os.path.join(workdir, "agent.log")))

        def reported():
            status, body = request(api_url, "GET", "/routers/" + ROUTER_ID)
            return body if status == 200 and body.get("metrics") else None

        router = wait_for("the router's first heartbeat", reported, 30)
        print("\nWhat the router reported (GET /routers/%s):" % ROUTER_ID)
        print(json.dumps(router, indent=2))

        status, result = request(api_url, "POST", "/routers/%s/rpc" % ROUTER_ID,
                                 {"path": "spotfi.agent", "method": "info", "args": {}})
        print("\nRPC spotfi.agent info (POST /routers/%s/rpc), HTTP %d:" % (ROUTER_ID, status))
        print(json.dumps(result, indent=2))

        print("\nOpen a terminal on the router in another shell:")
        print("  PYTHONPATH=%s %s -m spotfi_refapi.xclient --url %s %s"
              % (os.path.join(ROOT, "refapi"), sys.executable, api_url, ROUTER_ID))
        print("\nCall the API yourself:")
        print("  curl %s/routers/%s" % (api_url, ROUTER_ID))
        print("  curl -X POST -H 'Content-Type: application/json' "
              "-d '{\"path\": \"spotfi.agent\", \"method\": \"ping\"}' %s/routers/%s/rpc"
              % (api_url, ROUTER_ID))
        print("\nPress Ctrl-C to stop everything the demo started.")
        while all(process.poll() is None for process in processes):
            time.sleep(0.5)
        failed.append(True)
        print("demo: a process exited unexpectedly")
    except KeyboardInterrupt:
        pass
    except BaseException:
        failed.append(True)
        raise
    finally:
        stop_all()
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
