"""Shared fixtures: real mosquitto, amqtt and redis-server on free 127.0.0.1 ports.

Servers are started by the fixtures and stopped by the PID they started. A
missing system binary (mosquitto, redis-server) skips the tests that need
it, except under CI=true, where it fails them: CI must install what the
suite needs. amqtt comes from the virtual environment, so its absence
always fails.
"""

import logging
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for folder in ("agent", "refapi", "tools"):
    path = os.path.join(ROOT, folder)
    if path not in sys.path:
        sys.path.insert(0, path)

import localservices  # noqa: E402


def _require(name):
    try:
        localservices.find_binary(name)
    except localservices.ServiceError as error:
        if os.environ.get("CI") == "true":
            pytest.fail(str(error))
        pytest.skip(str(error))


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory):
    """A mosquitto broker for the whole session, anonymous access allowed."""
    _require("mosquitto")
    service = localservices.mosquitto(str(tmp_path_factory.mktemp("mosquitto")))
    service.start()
    yield service
    service.stop()


@pytest.fixture
def private_mosquitto(tmp_path):
    """A mosquitto broker of the test's own, for tests that stop or restart it."""
    _require("mosquitto")
    service = localservices.mosquitto(str(tmp_path / "mosquitto"))
    service.start()
    yield service
    service.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A redis-server for the whole session; tests use their own key prefixes or databases."""
    _require("redis-server")
    service = localservices.redis(str(tmp_path_factory.mktemp("redis")))
    service.start()
    yield service
    service.stop()


class LogCollector(logging.Handler):
    """Log records of the agent, kept for a test to inspect."""

    def __init__(self):
        logging.Handler.__init__(self, logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)

    def messages(self, level=logging.WARNING):
        """Return the messages logged at `level` or above."""
        return [record.getMessage() for record in self.records if record.levelno >= level]

    def warnings(self):
        return self.messages(logging.WARNING)


@pytest.fixture
def logs():
    """Records of the spotfi_agent loggers, collected even when propagation is off."""
    logger = logging.getLogger("spotfi_agent")
    collector = LogCollector()
    old_level = logger.level
    logger.addHandler(collector)
    logger.setLevel(logging.DEBUG)
    yield collector
    logger.removeHandler(collector)
    logger.setLevel(old_level)


@pytest.fixture
def mqtt311_broker(tmp_path):
    """An amqtt broker of the test's own: a real broker that supports only MQTT 3.1.1.

    amqtt comes from requirements/dev.txt, not from the system. A missing
    amqtt means a stale virtual environment, so the test fails instead of
    being skipped, in CI and outside it.
    """
    try:
        service = localservices.amqtt(str(tmp_path / "amqtt"))
    except localservices.ServiceError as error:
        pytest.fail(str(error))
    try:
        service.start()
    except localservices.ServiceError:
        service.stop()
        raise
    yield service
    service.stop()
