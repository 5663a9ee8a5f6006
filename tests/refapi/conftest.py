"""Fixtures of the refapi tests: API instances, scripted routers and databases."""

import os

import pytest
import redis

from refapi_testing import PostgresCluster, RefapiInstance, ScriptedRouter, make_settings


@pytest.fixture(scope="session")
def postgres_cluster():
    """A PostgreSQL cluster for the session, skipped without Debian's postgresql (failed in CI)."""
    bindir = PostgresCluster.find_bindir()
    if bindir is None:
        message = ("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb); "
                   "run `apt-get install postgresql`")
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    cluster = PostgresCluster(bindir)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    """The URL of an empty database, once for SQLite and once for PostgreSQL."""
    if request.param == "sqlite":
        return "sqlite:///%s" % (tmp_path / "refapi.db")
    return request.getfixturevalue("postgres_cluster").create_database()


@pytest.fixture
def sqlite_url(tmp_path):
    return "sqlite:///%s" % (tmp_path / "refapi.db")


@pytest.fixture
def redis_client(redis_server):
    client = redis.Redis(port=redis_server.port, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def start_refapi(mosquitto, redis_server, sqlite_url):
    """Start API instances on the session broker and Redis, all stopped at teardown.

    Each call takes optional `instance_id`, `database_url` and Settings
    field overrides such as rpc_grace=0.5.
    """
    instances = []

    def start(instance_id=None, database_url=None, **overrides):
        settings = make_settings(mosquitto.port, redis_server.port, database_url or sqlite_url,
                                 instance_id, **overrides)
        instance = RefapiInstance(settings)
        instances.append(instance)
        return instance.start()

    yield start
    for instance in instances:
        instance.stop()


@pytest.fixture
def scripted_router(mosquitto):
    """Create connected ScriptedRouter peers.

    A scripted router is a protocol peer standing in for the agent only in
    the refapi unit tests; the end-to-end tests run the real agent. Each one
    clears its retained status at teardown.
    """
    routers = []

    def create(router_id=None):
        router = ScriptedRouter(mosquitto.port, router_id).connect()
        routers.append(router)
        return router

    yield create
    for router in routers:
        router.close()
