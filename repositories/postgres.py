"""The PostgreSQL back end's plumbing: the connection pool, the schema migrations, the heartbeat.

With `DATABASE_URL` set, every instance of the app on every host shares one database. The schema
lives in `repositories/migrations/NNNN_name.sql`; `migrate` applies the missing files in order, in
one transaction under a transaction-scoped advisory lock, so instances starting at the same moment
apply each file exactly once (the others wait, then find it done). No superuser rights are needed:
the role only creates tables in a database it owns.
"""

import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from psycopg import AsyncConnection, OperationalError, errors
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from schemas import InstanceSeen

logger = logging.getLogger(__name__)
T = TypeVar("T")

MIGRATIONS = Path(__file__).with_name("migrations")
_MIGRATION_LOCK = 0x62_78_32_34_6D_69_67  # an arbitrary app-wide key: "bx24mig"
INSTANCE_WINDOW_SECONDS = 60.0

# TCP keepalive, on both ends of every connection (libpq's for the client, the server's through
# `options`): a host that vanishes without closing its sockets is noticed after about
# idle 5 s + 3 probes x 2 s = 11 s, or 10 s of unacknowledged data (tcp_user_timeout). The server
# then ends the dead leader's session, which frees its advisory lock for another instance.
# https://www.postgresql.org/docs/current/libpq-connect.html#LIBPQ-KEEPALIVES
# https://www.postgresql.org/docs/current/runtime-config-connection.html#GUC-TCP-KEEPALIVES-IDLE
KEEPALIVE: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 10_000,
    "connect_timeout": 5,
    "options": "-c tcp_keepalives_idle=5 -c tcp_keepalives_interval=2 -c tcp_keepalives_count=3"
    " -c tcp_user_timeout=10000",
    "application_name": "bitrix24-contact-robot",
}


def new_instance_id() -> str:
    """This process's name in the `instances` table: host, pid and a random suffix."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


async def connect(url: str) -> AsyncConnection[Any]:
    """A dedicated autocommit connection (the worker's leadership lock lives on one)."""
    return await AsyncConnection.connect(url, autocommit=True, **KEEPALIVE)


async def open_pool(url: str, max_size: int = 10) -> AsyncConnectionPool[Any]:
    """The shared pool, opened and checked: a wrong URL or a server that is down fails the start."""
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        url,
        min_size=2,
        max_size=max_size,
        kwargs={"autocommit": True, **KEEPALIVE},
        open=False,
        name="app",
        # A robot call waits at most this for a connection: a database that is down gives a
        # prompt 503, not a portal request hanging for the default 30 s.
        timeout=5.0,
    )
    await pool.open(wait=True, timeout=15)
    return pool


def failure(exc: BaseException) -> str:
    """What went wrong with the database, in words fit for /health and replies: the kind of failure.

    The driver's own text goes to the log only: libpq's can name the server's host, address and
    port, the role and the database (`connection to server at "..."`, `password authentication
    failed for user "..."`), a server's data file, and it runs to several lines.
    """
    sqlstate = getattr(exc, "sqlstate", None) or ""
    if isinstance(exc, PoolTimeout):
        return "no connection to the database in time (is PostgreSQL running and reachable?)"
    if isinstance(exc, errors.ReadOnlySqlTransaction):
        return "the database is read-only (a standby, or default_transaction_read_only is on)"
    if sqlstate.startswith("53"):  # disk full, out of memory, too many connections
        return f"the database server is out of resources (SQLSTATE {sqlstate})"
    if isinstance(exc, OperationalError):
        return "the connection to the database failed"
    if sqlstate:
        return f"the database refused the request (SQLSTATE {sqlstate})"
    return f"the database request failed ({type(exc).__name__})"


async def with_retry(
    pool: AsyncConnectionPool[Any], work: Callable[[AsyncConnection[Any]], Awaitable[T]]
) -> T:
    """Run `work` (idempotent) on a pooled connection; once more if that connection was dead.

    After a database restart or a failover, the pool's idle connections are dead but look fine.
    Checking each one before use would cost a round trip per robot call; instead, the first
    failure checks the whole pool (dead connections are replaced) and the work is retried once,
    so a robot call is not refused because of a connection that died while idle.
    """
    try:
        async with pool.connection() as conn:
            return await work(conn)
    except OperationalError as exc:
        logger.warning("A database connection failed (%s); checking the pool and retrying once", exc)
        await pool.check()
    async with pool.connection() as conn:
        return await work(conn)


async def migrate(pool: AsyncConnectionPool[Any]) -> list[str]:
    """Apply the migrations this database lacks; returns their names."""
    applied: list[str] = []
    async with pool.connection() as conn, conn.transaction():
        # Held until commit: a second instance starting now waits here, then sees the work done.
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY,"
            " name TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        )
        cursor = await conn.execute("SELECT version FROM schema_migrations")
        done = {row[0] for row in await cursor.fetchall()}
        for path in sorted(MIGRATIONS.glob("[0-9][0-9][0-9][0-9]_*.sql")):
            version = int(path.name[:4])
            if version in done:
                continue
            await conn.execute(path.read_text(encoding="utf-8").encode())
            await conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (version, path.name)
            )
            applied.append(path.name)
    for name in applied:
        logger.info("Database schema: applied %s", name)
    return applied


class Heartbeat:
    """This instance's row in `instances`: refreshed every few seconds, read by /health."""

    def __init__(self, pool: AsyncConnectionPool[Any], instance_id: str) -> None:
        self._pool = pool
        self.instance_id = instance_id
        self._started = time.time()

    async def beat(self, leader: bool) -> None:
        now = time.time()
        host, pid, _ = self.instance_id.split(":", 2)
        async with self._pool.connection() as conn:
            await conn.execute(
                "INSERT INTO instances (instance_id, host, pid, started_at, seen_at, leader)"
                " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (instance_id) DO UPDATE"
                " SET seen_at = EXCLUDED.seen_at, leader = EXCLUDED.leader",
                (self.instance_id, host, int(pid), self._started, now, leader),
            )
            # Rows of instances gone for a day are noise in the table; the window shows a minute.
            await conn.execute("DELETE FROM instances WHERE seen_at < %s", (now - 86_400,))

    async def seen(self) -> list[InstanceSeen]:
        async with self._pool.connection() as conn:
            cursor = await conn.execute(
                "SELECT instance_id, seen_at, leader FROM instances WHERE seen_at >= %s ORDER BY instance_id",
                (time.time() - INSTANCE_WINDOW_SECONDS,),
            )
            rows = await cursor.fetchall()
        now = time.time()
        return [
            InstanceSeen(instance=row[0], seen_seconds_ago=round(max(0.0, now - row[1]), 1), leader=row[2])
            for row in rows
        ]
