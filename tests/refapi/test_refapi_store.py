"""SQL store tests, run against SQLite and a throwaway PostgreSQL cluster."""

import asyncio
import sqlite3

import pytest

from spotfi_refapi import config
from spotfi_refapi.errors import StoreError
from spotfi_refapi.store import Store


def run_with_store(database_url, steps):
    """Return the result of `await steps(store)` for a Store opened on `database_url`."""

    async def main():
        store = Store(config.parse_database_url(database_url))
        await store.open()
        try:
            return await steps(store)
        finally:
            await store.close()

    return asyncio.run(main())


def test_store_schema_creation_is_idempotent(database_url):
    async def steps(store):
        await store.open()
        await store.ping()
        return await store.list_routers()

    assert run_with_store(database_url, steps) == []
    assert run_with_store(database_url, steps) == []


def test_store_online_creates_router_and_nas(database_url):
    async def steps(store):
        name = await store.mark_online("r1", 1000.5)
        return name, await store.get_router("r1"), await store.get_nas("r1")

    name, router, nas = run_with_store(database_url, steps)
    assert name == "r1"
    assert router["status"] == "online"
    assert router["lastSeen"] == 1000.5
    assert router["createdAt"] == 1000.5
    assert router["nasShortname"] == "r1"
    assert len(nas) == 1
    assert nas[0]["nasname"] == "r1"
    assert nas[0]["shortname"] == "r1"
    assert nas[0]["type"] == "other"
    assert nas[0]["description"] == "SpotFi router"
    assert len(nas[0]["secret"]) >= 20


def test_store_nas_secret_stable_over_two_onlines(database_url):
    async def steps(store):
        await store.mark_online("r1", 1000.0)
        first = await store.get_nas("r1")
        await store.mark_online("r1", 2000.0)
        return first, await store.get_nas("r1"), await store.get_router("r1")

    first, second, router = run_with_store(database_url, steps)
    assert len(second) == 1
    assert second[0]["secret"] == first[0]["secret"]
    assert router["lastSeen"] == 2000.0
    assert router["createdAt"] == 1000.0


def test_store_shortname_cut_to_30_characters(database_url):
    long_id = "router-" + "x" * 40

    async def steps(store):
        await store.mark_online(long_id, 1.0)
        await store.set_router_name(long_id, "Lobby access point of the north building")
        await store.mark_online(long_id, 2.0)
        return await store.get_nas(long_id)

    nas = run_with_store(database_url, steps)
    assert nas[0]["nasname"] == long_id
    assert nas[0]["shortname"] == "Lobby access point of the nort"
    assert len(nas[0]["shortname"]) == 30


def test_store_offline_keeps_last_seen(database_url):
    async def steps(store):
        await store.mark_online("r1", 1000.0)
        await store.mark_offline("r1")
        await store.mark_offline("never-seen")
        return await store.get_router("r1"), await store.get_router("never-seen")

    router, unknown = run_with_store(database_url, steps)
    assert router["status"] == "offline"
    assert router["lastSeen"] == 1000.0
    assert unknown is None


def test_store_list_routers_ordered_by_id(database_url):
    async def steps(store):
        for router_id in ("b", "c", "a"):
            await store.mark_online(router_id, 1.0)
        return await store.list_routers()

    routers = run_with_store(database_url, steps)
    assert [router["id"] for router in routers] == ["a", "b", "c"]


def test_store_concurrent_onlines_one_nas_row(database_url):
    async def steps(store):
        other = Store(store.database)
        await other.open()
        try:
            await asyncio.gather(*[target.mark_online("r1", 1.0)
                                   for target in (store, other) * 5])
        finally:
            await other.close()
        return await store.get_nas("r1")

    nas = run_with_store(database_url, steps)
    assert len(nas) == 1


FREERADIUS_SQLITE_NAS = """
CREATE TABLE nas (
    id INTEGER PRIMARY KEY,
    nasname VARCHAR(128) NOT NULL,
    shortname VARCHAR(32),
    type VARCHAR(30) DEFAULT 'other',
    ports INT,
    secret VARCHAR(60) DEFAULT 'secret' NOT NULL,
    server VARCHAR(64),
    community VARCHAR(50),
    description VARCHAR(200) DEFAULT 'RADIUS Client'
);
CREATE INDEX nasname ON nas(nasname);
INSERT INTO nas (nasname, shortname, secret) VALUES ('10.0.0.1', 'switch', 'kept');
"""


def test_store_uses_existing_freeradius_table(tmp_path):
    path = tmp_path / "radius.db"
    with sqlite3.connect(path) as connection:
        connection.executescript(FREERADIUS_SQLITE_NAS)

    async def steps(store):
        await store.mark_online("r1", 1.0)
        return await store.get_nas("r1"), await store.get_nas("10.0.0.1")

    nas, other = run_with_store("sqlite:///%s" % path, steps)
    assert nas[0]["shortname"] == "r1"
    assert other[0]["secret"] == "kept"


def test_store_keeps_secret_of_existing_nas_row(tmp_path):
    path = tmp_path / "radius.db"
    with sqlite3.connect(path) as connection:
        connection.executescript(FREERADIUS_SQLITE_NAS)
        connection.execute("INSERT INTO nas (nasname, shortname, secret) "
                           "VALUES ('r1', 'old', 'operator-set')")

    async def steps(store):
        await store.mark_online("r1", 1.0)
        return await store.get_nas("r1")

    nas = run_with_store("sqlite:///%s" % path, steps)
    assert len(nas) == 1
    assert nas[0]["secret"] == "operator-set"
    assert nas[0]["shortname"] == "r1"


def test_store_postgresql_unreachable_raises(tmp_path):
    import localservices

    url = "postgresql://postgres@127.0.0.1:%d/none" % localservices.free_port()
    store = Store(config.parse_database_url(url))
    with pytest.raises(StoreError) as raised:
        asyncio.run(store.open())
    assert "could not create the schema in postgresql database" in str(raised.value)


def test_store_sqlite_unwritable_path_raises(tmp_path):
    store = Store(config.parse_database_url("sqlite:///%s/missing/dir/x.db" % tmp_path))
    with pytest.raises(StoreError) as raised:
        asyncio.run(store.open())
    assert "unable to open database file" in str(raised.value)
