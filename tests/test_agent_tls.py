"""The agent over TLS to a real mosquitto TLS listener, with certificates made by trustme."""

import os

import pytest
import trustme

import localservices
from harness import HostRouter, wait_until

TRANSPORTS = ["native", "paho"]


@pytest.fixture(scope="module")
def authority(tmp_path_factory):
    """A test CA, a server certificate for localhost and a client certificate, as files."""
    folder = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server = ca.issue_cert("localhost")
    client = ca.issue_cert("tls-client-router")
    paths = {
        "ca": folder / "ca.pem",
        "server_cert": folder / "server.pem",
        "server_key": folder / "server.key",
        "client_cert": folder / "client.pem",
        "client_key": folder / "client.key",
    }
    ca.cert_pem.write_to_path(str(paths["ca"]))
    server.cert_chain_pems[0].write_to_path(str(paths["server_cert"]))
    server.private_key_pem.write_to_path(str(paths["server_key"]))
    client.cert_chain_pems[0].write_to_path(str(paths["client_cert"]))
    client.private_key_pem.write_to_path(str(paths["client_key"]))
    return {name: str(path) for name, path in paths.items()}


def tls_broker(workdir, authority, require_certificate=False):
    port = localservices.free_port()
    lines = ["cafile %s" % authority["ca"], "certfile %s" % authority["server_cert"],
             "keyfile %s" % authority["server_key"]]
    if require_certificate:
        lines.append("require_certificate true")
    service = localservices.mosquitto(str(workdir), port=port)
    # The TLS options apply to the listener defined first in the file.
    with open(os.path.join(str(workdir), "mosquitto.conf")) as handle:
        conf = handle.read().splitlines()
    conf[1:1] = lines
    with open(os.path.join(str(workdir), "mosquitto.conf"), "w") as handle:
        handle.write("\n".join(conf) + "\n")
    return service


def tls_router(tmp_path, name, port, authority, host="localhost", client_certificate=False,
               transport="native"):
    router = HostRouter(tmp_path / name, name, [], transport=transport)
    os.makedirs(os.path.join(router.root, "etc", "spotfi", "pki"), exist_ok=True)
    for key in ("ca", "client_cert", "client_key"):
        target = os.path.join(router.root, "etc", "spotfi", "pki", os.path.basename(authority[key]))
        with open(authority[key], "rb") as source, open(target, "wb") as copy:
            copy.write(source.read())
    router.options["ca_file"] = "/etc/spotfi/pki/ca.pem"
    if client_certificate:
        router.options["cert_file"] = "/etc/spotfi/pki/client.pem"
        router.options["key_file"] = "/etc/spotfi/pki/client.key"
    router.broker_ports = []
    router.write_config()
    with open(os.path.join(router.root, "etc", "config", "spotfi"), "a") as handle:
        handle.write("\tlist broker 'mqtts://%s:%d'\n" % (host, port))
    return router


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_tls_connects_with_ca_file(tmp_path, authority, transport):
    broker = tls_broker(tmp_path / "broker", authority).start()
    router = tls_router(tmp_path, "tls-%s" % transport, broker.port, authority, transport=transport)
    try:
        router.start()
        wait_until(lambda: "connected to mqtts://localhost" in router.log_text(), 15,
                   message="TLS connection")
        log = router.log_text()
    finally:
        router.stop()
        broker.stop()

    assert "cannot connect" not in log


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_tls_rejects_wrong_hostname(tmp_path, authority, transport):
    broker = tls_broker(tmp_path / "broker", authority).start()
    router = tls_router(tmp_path, "tls-host-%s" % transport, broker.port, authority,
                        host="127.0.0.1", transport=transport)
    try:
        router.start()
        wait_until(lambda: "cannot connect" in router.log_text(), 15, message="TLS failure logged")
        log = router.log_text()
    finally:
        router.stop()
        broker.stop()

    assert "connected to mqtts" not in log
    assert "certificate" in log.lower() or "hostname" in log.lower() or "ip address mismatch" in log.lower()


def test_tls_client_certificate(tmp_path, authority):
    broker = tls_broker(tmp_path / "broker", authority, require_certificate=True).start()
    with_certificate = tls_router(tmp_path, "tls-cert", broker.port, authority,
                                  client_certificate=True)
    without_certificate = tls_router(tmp_path, "tls-nocert", broker.port, authority)
    try:
        with_certificate.start()
        without_certificate.start()
        wait_until(lambda: "connected to mqtts://localhost" in with_certificate.log_text(), 15,
                   message="TLS connection with a client certificate")
        wait_until(lambda: "cannot connect" in without_certificate.log_text(), 15,
                   message="TLS failure without a client certificate")
    finally:
        with_certificate.stop()
        without_certificate.stop()
        broker.stop()

    assert "connected to mqtts" not in without_certificate.log_text()


def test_check_over_tls(tmp_path, authority):
    import subprocess
    import sys
    broker = tls_broker(tmp_path / "broker", authority).start()
    router = tls_router(tmp_path, "tls-check", broker.port, authority)
    try:
        result = subprocess.run([sys.executable, "-m", "spotfi_agent", "--root", router.root, "check"],
                                env=router.environment(), capture_output=True, text=True, timeout=30)
    finally:
        broker.stop()

    assert result.returncode == 0
    assert result.stdout.startswith("OK: connected to mqtts://localhost:%d" % broker.port)
