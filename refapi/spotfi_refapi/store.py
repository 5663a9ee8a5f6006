"""SQL storage of routers and their FreeRADIUS `nas` rows, on SQLite or PostgreSQL.

Both dialects share the statements below, written with `?` placeholders and
`INSERT ... ON CONFLICT ... RETURNING`, which SQLite 3.35 and later and
PostgreSQL 9.5 and later accept alike.
The dialect switch is small: `%s` placeholders, the `nas` table's key type,
and how concurrent NAS upserts are serialized.

Times are stored as Unix seconds (a float) so both dialects read them alike.
"""

import asyncio
import contextlib
import logging
import secrets
import sqlite3

from .errors import StoreError

log = logging.getLogger(__name__)

NAS_SHORTNAME_LENGTH = 30
NAS_TYPE = "other"
NAS_DESCRIPTION = "SpotFi router"

ROUTERS_TABLE = """
CREATE TABLE IF NOT EXISTS routers (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'offline',
    last_seen DOUBLE PRECISION,
    created_at DOUBLE PRECISION NOT NULL
)
"""

# The columns and defaults of FreeRADIUS 3 raddb/mods-config/sql/main/{sqlite,
# postgresql}/schema.sql, so that rlm_sql reads these rows as RADIUS clients.
NAS_TABLE = {
    "sqlite": """
CREATE TABLE IF NOT EXISTS nas (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    nasname VARCHAR(128) NOT NULL,
    shortname VARCHAR(32),
    type VARCHAR(30) DEFAULT 'other',
    ports INT,
    secret VARCHAR(60) DEFAULT 'secret' NOT NULL,
    server VARCHAR(64),
    community VARCHAR(50),
    description VARCHAR(200) DEFAULT 'RADIUS Client'
)
""",
    "postgresql": """
CREATE TABLE IF NOT EXISTS nas (
    id SERIAL PRIMARY KEY,
    nasname TEXT NOT NULL,
    shortname TEXT NOT NULL,
    type TEXT NOT NULL DEFAULT 'other',
    ports INTEGER,
    secret TEXT NOT NULL,
    server TEXT,
    community TEXT,
    description TEXT
)
""",
}
NAS_INDEX = "CREATE INDEX IF NOT EXISTS nas_nasname ON nas (nasname)"

UPSERT_ONLINE = """
INSERT INTO routers (id, name, status, last_seen, created_at) VALUES (?, ?, 'online', ?, ?)
ON CONFLICT (id) DO UPDATE SET status = 'online', last_seen = excluded.last_seen
RETURNING name
"""
UPDATE_OFFLINE = "UPDATE routers SET status = 'offline' WHERE id = ?"
SELECT_NAS_SECRET = "SELECT secret FROM nas WHERE nasname = ? ORDER BY id LIMIT 1"
UPDATE_NAS = "UPDATE nas SET shortname = ?, type = ?, description = ? WHERE nasname = ?"
INSERT_NAS = ("INSERT INTO nas (nasname, shortname, type, secret, description) "
              "VALUES (?, ?, ?, ?, ?)")
SELECT_NAS = ("SELECT nasname, shortname, type, secret, description FROM nas "
              "WHERE nasname = ? ORDER BY id")
SELECT_ROUTERS = """
SELECT id, name, status, last_seen, created_at,
       (SELECT shortname FROM nas WHERE nas.nasname = routers.id ORDER BY nas.id LIMIT 1)
FROM routers
"""
ROUTER_COLUMNS = ("id", "name", "status", "lastSeen", "createdAt", "nasShortname")


def nas_shortname(name):
    """Return the NAS shortname for a router name: its first 30 characters."""
    return name[:NAS_SHORTNAME_LENGTH]


class _SqliteTransaction:
    """Statements of one SQLite transaction, each run in a worker thread."""

    def __init__(self, connection):
        self._connection = connection

    async def fetch(self, sql, params=()):
        return await asyncio.to_thread(self._fetch, sql, params)

    def _fetch(self, sql, params):
        return self._connection.execute(sql, params).fetchall()

    async def lock_nas(self, nasname):
        # BEGIN IMMEDIATE already holds the database's write lock.
        pass


class _SqliteBackend:
    """One SQLite connection shared by all requests, one transaction at a time."""

    def __init__(self, path):
        self.path = path
        self._connection = None
        self._lock = asyncio.Lock()

    async def open(self):
        self._connection = await asyncio.to_thread(self._connect)

    def _connect(self):
        # isolation_level=None leaves transactions to the explicit BEGIN below.
        # The timeout waits while another process (a second instance) has the lock.
        return sqlite3.connect(self.path, timeout=10.0, isolation_level=None,
                               check_same_thread=False)

    async def close(self):
        if self._connection is not None:
            await asyncio.to_thread(self._connection.close)
            self._connection = None

    @contextlib.asynccontextmanager
    async def transaction(self, write):
        async with self._lock:
            connection = self._connection
            await asyncio.to_thread(connection.execute, "BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield _SqliteTransaction(connection)
            except BaseException:
                await asyncio.to_thread(connection.rollback)
                raise
            await asyncio.to_thread(connection.commit)


class _PostgresTransaction:
    """Statements of one PostgreSQL transaction on a psycopg AsyncConnection."""

    def __init__(self, connection):
        self._connection = connection

    async def fetch(self, sql, params=()):
        cursor = await self._connection.execute(sql.replace("?", "%s"), params)
        if cursor.description is None:
            return []
        return await cursor.fetchall()

    async def lock_nas(self, nasname):
        # FreeRADIUS indexes nas.nasname without UNIQUE, so ON CONFLICT cannot
        # be used. This lock keeps two instances from inserting the same NAS.
        await self._connection.execute("SELECT pg_advisory_xact_lock(hashtext(%s))",
                                       ("spotfi-nas:" + nasname,))


class _PostgresBackend:
    """One psycopg AsyncConnection, opened again after a failure."""

    def __init__(self, url):
        self.url = url
        self._connection = None
        self._lock = asyncio.Lock()

    async def open(self):
        await self._connect()

    async def _connect(self):
        import psycopg

        if self._connection is None or self._connection.closed:
            self._connection = await psycopg.AsyncConnection.connect(
                self.url, autocommit=True, connect_timeout=10)
        return self._connection

    async def close(self):
        if self._connection is not None:
            await self._connection.close()
            self._connection = None

    @contextlib.asynccontextmanager
    async def transaction(self, write):
        import psycopg

        async with self._lock:
            connection = await self._connect()
            try:
                async with connection.transaction():
                    yield _PostgresTransaction(connection)
            except psycopg.OperationalError:
                # The next transaction opens a new connection.
                await connection.close()
                raise


class Store:
    """Routers and FreeRADIUS NAS rows in the database named by DatabaseSettings."""

    def __init__(self, database):
        self.database = database
        if database.dialect == "sqlite":
            self._backend = _SqliteBackend(database.target)
            self._errors = (sqlite3.Error,)
        else:
            import psycopg

            self._backend = _PostgresBackend(database.target)
            self._errors = (psycopg.Error,)

    async def open(self):
        """Connect and create the `routers` and `nas` tables when they are missing."""
        async with self._failures("create the schema"):
            await self._backend.open()
            async with self._backend.transaction(write=True) as tx:
                await tx.fetch(ROUTERS_TABLE)
                await tx.fetch(NAS_TABLE[self.database.dialect])
                await tx.fetch(NAS_INDEX)

    async def close(self):
        async with self._failures("close the connection"):
            await self._backend.close()

    async def ping(self):
        """Run `SELECT 1`, raising StoreError when the database is unreachable."""
        async with self._failures("run SELECT 1"):
            async with self._backend.transaction(write=False) as tx:
                await tx.fetch("SELECT 1")

    async def mark_online(self, router_id, now):
        """Mark the router online (adding it when new) and upsert its NAS row.

        Return the router's name. The NAS secret is generated on the first
        upsert and kept afterwards.
        """
        async with self._failures("mark router %s online" % router_id):
            async with self._backend.transaction(write=True) as tx:
                rows = await tx.fetch(UPSERT_ONLINE, (router_id, router_id, now, now))
                name = rows[0][0]
                shortname = nas_shortname(name)

                await tx.lock_nas(router_id)
                if await tx.fetch(SELECT_NAS_SECRET, (router_id,)):
                    await tx.fetch(UPDATE_NAS, (shortname, NAS_TYPE, NAS_DESCRIPTION, router_id))
                else:
                    secret = secrets.token_urlsafe(24)
                    await tx.fetch(INSERT_NAS, (router_id, shortname, NAS_TYPE, secret,
                                                NAS_DESCRIPTION))
                return name

    async def mark_offline(self, router_id):
        """Mark a known router offline. A router without a row stays unknown."""
        async with self._failures("mark router %s offline" % router_id):
            async with self._backend.transaction(write=True) as tx:
                await tx.fetch(UPDATE_OFFLINE, (router_id,))

    async def get_router(self, router_id):
        """Return the router as a dict (see ROUTER_COLUMNS), or None when unknown."""
        async with self._failures("read router %s" % router_id):
            async with self._backend.transaction(write=False) as tx:
                rows = await tx.fetch(SELECT_ROUTERS + " WHERE id = ?", (router_id,))
        if not rows:
            return None
        return dict(zip(ROUTER_COLUMNS, rows[0]))

    async def list_routers(self):
        """Return every router as a dict (see ROUTER_COLUMNS), ordered by id."""
        async with self._failures("list routers"):
            async with self._backend.transaction(write=False) as tx:
                rows = await tx.fetch(SELECT_ROUTERS + " ORDER BY id")
        return [dict(zip(ROUTER_COLUMNS, row)) for row in rows]

    async def get_nas(self, router_id):
        """Return the NAS rows of a router, secrets included, for operators and tests."""
        async with self._failures("read the NAS rows of router %s" % router_id):
            async with self._backend.transaction(write=False) as tx:
                rows = await tx.fetch(SELECT_NAS, (router_id,))
        columns = ("nasname", "shortname", "type", "secret", "description")
        return [dict(zip(columns, row)) for row in rows]

    async def set_router_name(self, router_id, name):
        """Rename a known router. Its NAS shortname changes at the next ONLINE."""
        async with self._failures("rename router %s" % router_id):
            async with self._backend.transaction(write=True) as tx:
                await tx.fetch("UPDATE routers SET name = ? WHERE id = ?", (name, router_id))

    @contextlib.asynccontextmanager
    async def _failures(self, action):
        """Convert driver errors into one StoreError that names the action and database."""
        try:
            yield
        except self._errors as error:
            message = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
            raise StoreError("could not %s in %s database %s: %s"
                             % (action, self.database.dialect, self.database.url,
                                message)) from None
