"""`TokenStore` in PostgreSQL: one row per portal, shared by every instance on every host.

`refresh_lock` holds a row lock (`SELECT ... FOR UPDATE`) on the portal's row for the whole
read-refresh-save, so one refresh happens at a time across all instances; the others wait, then
read the rotated pair. Inside the lock, `get` and `save` run on the locking connection, and `save`
commits at once: the rotated pair is durable before the caller uses it.
"""

import asyncio
import contextvars
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from functools import partial
from typing import Any

from psycopg import AsyncConnection, Error
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool
from pydantic import ValidationError

from repositories.postgres import failure, with_retry
from repositories.token_cipher import TokenCipher, TokenKeyError
from repositories.token_store import TokenKeyMismatch, TokenStoreError
from schemas import PortalTokens

logger = logging.getLogger(__name__)
Rows = list[tuple[Any, ...]]
CACHE_SECONDS = 1.0

# The connection holding a portal's row lock, for the task (and its children) inside refresh_lock.
_locked: contextvars.ContextVar[tuple[str, AsyncConnection[Any]] | None] = contextvars.ContextVar(
    "locked_token_row", default=None
)


class PostgresTokenStore:
    def __init__(self, pool: AsyncConnectionPool[Any], cipher: TokenCipher | None = None) -> None:
        self._pool = pool
        self._cipher = cipher or TokenCipher(None)
        self._local: dict[str, asyncio.Lock] = {}
        self._cache: dict[str, tuple[float, PortalTokens | None]] = {}
        # The read under way per portal: calls that find the cached copy expired share it.
        self._reading: dict[str, asyncio.Future[PortalTokens | None]] = {}
        self._writes = 0  # counts writes: a read that a write overtook is not cached
        self._kept: dict[str, tuple[PortalTokens, TokenStoreError]] = {}  # rotated, not yet stored

    async def get(self, member_id: str, *, fresh: bool = False) -> PortalTokens | None:
        """The portal's record (or its rotated pair not yet stored; see `save_rotated`)."""
        kept = self._kept.get(member_id)
        try:
            stored = await self._stored(member_id, fresh)
        except TokenStoreError:
            if kept is None:
                raise
            return kept[0]
        return _newest(kept[0] if kept else None, stored)

    async def _stored(self, member_id: str, fresh: bool) -> PortalTokens | None:
        """The portal's stored record; `fresh` reads the database, else a copy at most a second old.

        Every robot call reads its portal's record to authenticate it; a database round trip costs
        more than the rest of the acknowledgement. A second's staleness only matters for a
        reinstall or uninstall made through another instance; a refresh always reads fresh. When
        the copy expires under load, the calls that arrive meanwhile wait for one read, not one
        each (about 30 reads a second per portal and instance at 32 concurrent calls).
        """
        cached = self._cache.get(member_id)
        if not fresh and cached is not None and time.monotonic() - cached[0] < CACHE_SECONDS:
            return cached[1]
        locked = _locked.get()
        if fresh or (locked is not None and locked[0] == member_id):
            return await self._read(member_id)
        reading = self._reading.get(member_id)
        if reading is None:
            reading = asyncio.ensure_future(self._read(member_id))
            self._reading[member_id] = reading
            reading.add_done_callback(partial(self._read_done, member_id))
        return await asyncio.shield(reading)

    def _read_done(self, member_id: str, reading: "asyncio.Future[PortalTokens | None]") -> None:
        if self._reading.get(member_id) is reading:
            del self._reading[member_id]
        if not reading.cancelled():
            reading.exception()  # retrieved: each waiter got it already

    async def _read(self, member_id: str) -> PortalTokens | None:
        now, writes = time.monotonic(), self._writes
        sql = "SELECT record FROM portal_tokens WHERE member_id = %s"
        rows = await self._fetch(sql, (member_id,), member_id)
        record = self._record(rows[0][0]) if rows else None
        if len(self._cache) > 10_000:  # unknown member ids are cached too: keep the dict bounded
            self._cache.clear()
        if writes == self._writes:
            self._cache[member_id] = (now, record)
        return record

    async def list(self) -> list[PortalTokens]:
        rows = await self._fetch("SELECT record FROM portal_tokens ORDER BY member_id", (), None)
        records = {record.member_id: record for record in (self._record(row[0]) for row in rows)}
        for member_id, (kept, _) in list(self._kept.items()):
            records[member_id] = _newest(kept, records.get(member_id)) or kept
        return list(records.values())

    async def save_rotated(self, record: PortalTokens) -> None:
        """Store a pair the OAuth server has just rotated; kept in memory if the database refuses.

        The kept pair is what `get` returns and what `flush` (at the next refresh, and from the
        token upkeep) writes, unless a later record (a new install) has been stored meanwhile.
        Other instances read the database meanwhile, so they see the old pair: when the database
        is down for them too they cannot refresh anyway.
        """
        try:
            await self.save(record)
        except TokenStoreError as exc:
            self._kept[record.member_id] = (record, exc)
            logger.error(
                "%s The new tokens of portal %s are kept in memory and stored as soon as the database"
                " takes them; until then this instance does not refresh them again.",
                exc,
                record.domain,
            )

    async def flush(self, member_id: str | None = None) -> None:
        for key in [member_id] if member_id else list(self._kept):
            kept = self._kept.get(key or "")
            if kept is None:
                continue
            record = kept[0]
            sealed = Jsonb(self._cipher.seal(record.model_dump(mode="json")))
            try:
                async with self._pool.connection() as conn:
                    # Unless a later record (a new install) was stored meanwhile.
                    await conn.execute(
                        "INSERT INTO portal_tokens (member_id, record, updated_at) VALUES (%s, %s, %s)"
                        " ON CONFLICT (member_id) DO UPDATE SET record = EXCLUDED.record,"
                        " updated_at = EXCLUDED.updated_at"
                        " WHERE (portal_tokens.record->>'updated_at')::float8 <= %s",
                        (record.member_id, sealed, time.time(), record.updated_at),
                    )
            except Error as exc:
                error = _store_error("save", exc)
                self._kept[record.member_id] = (record, error)
                raise error from exc
            self._kept.pop(record.member_id, None)
            self._forget(record.member_id)
            logger.info("The kept tokens of portal %s are stored in the database", record.domain)

    def unsaved(self) -> dict[str, str]:
        return {member_id: str(error) for member_id, (_, error) in self._kept.items()}

    async def save(self, record: PortalTokens) -> None:
        sealed = Jsonb(self._cipher.seal(record.model_dump(mode="json")))
        sql = (
            "INSERT INTO portal_tokens (member_id, record, updated_at) VALUES (%s, %s, %s)"
            " ON CONFLICT (member_id) DO UPDATE"
            " SET record = EXCLUDED.record, updated_at = EXCLUDED.updated_at"
        )
        locked = _locked.get()
        self._forget(record.member_id)
        try:
            if locked is not None and locked[0] == record.member_id:
                await locked[1].execute(sql, (record.member_id, sealed, time.time()))
                await locked[1].commit()  # durable before use; this also ends the row lock
            else:
                async with self._pool.connection() as conn:
                    await conn.execute(sql, (record.member_id, sealed, time.time()))
        except Error as exc:
            raise _store_error("save", exc) from exc
        finally:
            self._forget(record.member_id)  # a read that raced the write must not stay
        kept = self._kept.get(record.member_id)
        if kept is not None and record.updated_at >= kept[0].updated_at:
            self._kept.pop(record.member_id, None)  # superseded by what was just stored

    async def delete(self, member_id: str) -> None:
        self._forget(member_id)
        self._kept.pop(member_id, None)
        try:
            async with self._pool.connection() as conn:
                await conn.execute("DELETE FROM portal_tokens WHERE member_id = %s", (member_id,))
        except Error as exc:
            raise _store_error("delete", exc) from exc

    def _forget(self, member_id: str) -> None:
        """After a write: no cached copy, and no read begun before it is shared with later calls."""
        self._writes += 1
        self._cache.pop(member_id, None)
        self._reading.pop(member_id, None)

    def refresh_lock(self, member_id: str) -> AbstractAsyncContextManager[None]:
        return self._refresh_lock(member_id)

    @asynccontextmanager
    async def _refresh_lock(self, member_id: str) -> AsyncIterator[None]:
        # The asyncio lock queues this instance's tasks on one row lock instead of on many connections.
        async with self._local.setdefault(member_id, asyncio.Lock()), self._pool.connection() as conn:
            await conn.set_autocommit(False)
            try:
                await conn.execute(
                    "SELECT 1 FROM portal_tokens WHERE member_id = %s FOR UPDATE", (member_id,)
                )
                token = _locked.set((member_id, conn))
                try:
                    yield
                finally:
                    _locked.reset(token)
                # A rotated pair is committed (or kept) by save_rotated already: this only ends
                # the lock, which the server ends anyway if the connection is gone.
                with suppress(Error):
                    await conn.commit()
            except BaseException:
                with suppress(Error):  # a broken connection: the pool discards it anyway
                    await conn.rollback()
                raise
            finally:
                with suppress(Error):
                    await conn.set_autocommit(True)

    async def _fetch(self, sql: str, params: tuple[Any, ...], member_id: str | None) -> Rows:
        locked = _locked.get()
        try:
            if locked is not None and locked[0] == member_id:
                cursor = await locked[1].execute(sql, params)
                rows: Rows = await cursor.fetchall()
                return rows
            return await with_retry(self._pool, lambda conn: _fetchall(conn, sql, params))
        except Error as exc:
            raise _store_error("read", exc) from exc

    def _record(self, stored: Any) -> PortalTokens:
        try:
            data = json.loads(stored) if isinstance(stored, str) else stored
            return PortalTokens.model_validate(self._cipher.open(data))
        except TokenKeyError as exc:
            raise TokenKeyMismatch(f"{exc}; the app will not overwrite the stored tokens.") from exc
        except (ValueError, ValidationError) as exc:
            raise TokenStoreError(f"A stored token record is unreadable ({type(exc).__name__})") from exc


def _store_error(action: str, exc: Error) -> TokenStoreError:
    """The error /health, the status page and 503 replies show; the driver's text only in the log."""
    logger.warning("The token store (PostgreSQL) failed to %s: %s", action, exc)
    return TokenStoreError(f"The token store (PostgreSQL, DATABASE_URL) failed to {action}: {failure(exc)}.")


async def _fetchall(conn: AsyncConnection[Any], sql: str, params: tuple[Any, ...]) -> Rows:
    cursor = await conn.execute(sql, params)
    rows: Rows = await cursor.fetchall()
    return rows


def _newest(kept: PortalTokens | None, stored: PortalTokens | None) -> PortalTokens | None:
    """The kept pair, unless the database holds a later record (a new install)."""
    if kept is None or (stored is not None and stored.updated_at > kept.updated_at):
        return stored
    return kept
