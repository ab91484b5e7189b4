"""Who runs the job worker: exactly one process among all that share the state.

A single worker keeps one client-side rate bucket per portal (N workers would each spend the
portal's whole limit) and makes the biggest batches. The others only accept robot calls.

- `FileLeadership` (the embedded back end): a file lock beside the journal; the OS frees it when
  the process dies, so another `--workers` process takes over.
- `PostgresLeadership` (`DATABASE_URL`): a session advisory lock held on a dedicated connection;
  the server frees it when that connection ends: at once when the process dies, and after the TCP
  keepalive bound (repositories/postgres.py, about 11 s) when its whole host vanishes.
"""

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from pathlib import Path
from typing import Any, Protocol

from filelock import FileLock, Timeout
from psycopg import AsyncConnection, Error

from repositories.postgres import connect

logger = logging.getLogger(__name__)

_LEADER_LOCK = 0x62_78_32_34_77_6B_72  # an arbitrary app-wide key: "bx24wkr"
_FILE_POLL_SECONDS = 2.0
# How often a follower asks for the lock, and the leader checks its connection: with the lease
# reclaim on takeover, a killed leader's jobs resume within this plus one worker pass.
PG_POLL_SECONDS = 1.0
# A leader cut off from the database stops within poll + this, well before the server (TCP
# keepalive, about 11 s) frees its lock for another instance: never two workers at once.
_PING_TIMEOUT_SECONDS = 5.0


class Leadership(Protocol):
    leading: bool

    def hold(self) -> AbstractAsyncContextManager[asyncio.Event]:
        """Wait until this process leads; the event is set if leadership is lost while held."""
        ...


class FileLeadership:
    def __init__(self, path: Path) -> None:
        self._path = path
        self.leading = False

    def hold(self) -> AbstractAsyncContextManager[asyncio.Event]:
        return self._hold()

    @asynccontextmanager
    async def _hold(self) -> AsyncIterator[asyncio.Event]:
        lock = FileLock(self._path, thread_local=False)
        while True:
            try:
                lock.acquire(blocking=False)
                break
            except Timeout:
                await asyncio.sleep(_FILE_POLL_SECONDS)
        self.leading = True
        try:
            yield asyncio.Event()  # a held file lock is never lost
        finally:
            self.leading = False
            lock.release()


class PostgresLeadership:
    def __init__(self, url: str, instance_id: str) -> None:
        self._url = url
        self.instance_id = instance_id
        self.leading = False

    def hold(self) -> AbstractAsyncContextManager[asyncio.Event]:
        return self._hold()

    @asynccontextmanager
    async def _hold(self) -> AsyncIterator[asyncio.Event]:
        conn = await self._acquire()
        lost = asyncio.Event()
        watchdog = asyncio.create_task(self._watch(conn, lost), name="leadership-watchdog")
        self.leading = True
        try:
            yield lost
        finally:
            self.leading = False
            watchdog.cancel()
            with suppress(asyncio.CancelledError):
                await watchdog
            with suppress(Error):
                await conn.close()  # ends the session: the server frees the lock

    async def _acquire(self) -> AsyncConnection[Any]:
        while True:
            conn: AsyncConnection[Any] | None = None
            try:
                conn = await connect(self._url)
                # The leader is whoever's session holds the lock; /health finds it by this name.
                await conn.execute("SELECT set_config('application_name', %s, false)", (self.instance_id,))
                while True:
                    cursor = await conn.execute("SELECT pg_try_advisory_lock(%s)", (_LEADER_LOCK,))
                    row = await cursor.fetchone()
                    if row and row[0]:
                        return conn
                    await asyncio.sleep(PG_POLL_SECONDS)
            except Error as exc:
                logger.warning("Cannot reach the database to lead the worker (%s); retrying", exc)
                if conn is not None:
                    with suppress(Error):
                        await conn.close()
                await asyncio.sleep(PG_POLL_SECONDS)
            except BaseException:
                if conn is not None:
                    with suppress(Error):
                        await conn.close()
                raise

    async def _watch(self, conn: AsyncConnection[Any], lost: asyncio.Event) -> None:
        while True:
            await asyncio.sleep(PG_POLL_SECONDS)
            try:
                await asyncio.wait_for(conn.execute("SELECT 1"), timeout=_PING_TIMEOUT_SECONDS)
            except (Error, TimeoutError) as exc:
                logger.error("The worker's database session is gone (%s): this instance stops leading", exc)
                lost.set()
                return


async def current_leader(conn: AsyncConnection[Any]) -> str | None:
    """The instance whose session holds the worker lock, as the server sees it."""
    cursor = await conn.execute(
        "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
        " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1"
        " AND l.classid::bigint = (%s::bigint >> 32) AND l.objid::bigint = (%s::bigint & 4294967295)",
        (_LEADER_LOCK, _LEADER_LOCK),
    )
    row = await cursor.fetchone()
    return str(row[0]) if row else None
