"""The PostgreSQL token store's read cache, against a real server: when the cached copy expires,
the calls that arrive together share one read, and a write is never hidden by a read it overtook."""

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool

from repositories import pg_token_store
from repositories.pg_token_store import PostgresTokenStore
from repositories.postgres import migrate, open_pool
from schemas import PortalTokens
from tests.pg_server import TestPostgres

pytestmark = pytest.mark.anyio


def record(access: str) -> PortalTokens:
    return PortalTokens(
        member_id="m1",
        domain="example.bitrix24.ru",
        client_endpoint="https://example.bitrix24.ru/rest/",
        access_token=access,
        refresh_token="refresh-1",
        application_token="app-token-1",
        expires_at=time.time() + 3600,
    )


@pytest.fixture
async def pool(pg_server: TestPostgres) -> AsyncIterator[AsyncConnectionPool[Any]]:
    opened = await open_pool(pg_server.new_database())
    try:
        await migrate(opened)
        yield opened
    finally:
        await opened.close()


class CountedStore(PostgresTokenStore):
    """Counts the reads that reach the database; `gate` holds their answers until the test opens it."""

    def __init__(self, pool: AsyncConnectionPool[Any]) -> None:
        super().__init__(pool)
        self.reads = 0
        self.gate = asyncio.Event()
        self.gate.set()

    async def _fetch(self, sql: str, params: tuple[Any, ...], member_id: str | None) -> Any:
        self.reads += 1
        rows = await super()._fetch(sql, params, member_id)
        await self.gate.wait()
        return rows


async def test_calls_that_find_the_copy_expired_share_one_read(
    pool: AsyncConnectionPool[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = CountedStore(pool)
    await store.save(record("access-1"))
    monkeypatch.setattr(pg_token_store, "CACHE_SECONDS", 0.0)  # every get finds the copy expired

    got = await asyncio.gather(*(store.get("m1") for _ in range(30)))

    assert {tokens.access_token for tokens in got if tokens} == {"access-1"}
    assert store.reads == 1
    await store.get("m1", fresh=True)  # a refresh reads the database itself
    assert store.reads == 2


async def started_read(store: CountedStore) -> "asyncio.Future[PortalTokens | None]":
    """A get whose read of the database (access-2) is done but whose answer waits at the gate."""
    writer = PostgresTokenStore(store._pool)  # another instance
    await store.save(record("access-1"))
    await writer.save(record("access-2"))
    store.gate.clear()
    early = asyncio.ensure_future(store.get("m1"))
    while store.reads == 0:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    return early


async def test_a_read_overtaken_by_a_write_is_not_cached(pool: AsyncConnectionPool[Any]) -> None:
    store = CountedStore(pool)
    early = await started_read(store)

    await store.save(record("access-3"))  # this instance writes while that read is under way
    store.gate.set()

    early_record = await early
    assert early_record is not None
    assert early_record.access_token == "access-2"  # read before the write: that call's view
    again = await store.get("m1")
    assert again is not None
    assert again.access_token == "access-3"


async def test_a_read_begun_before_a_write_is_not_shared_after_it(pool: AsyncConnectionPool[Any]) -> None:
    store = CountedStore(pool)
    early = await started_read(store)

    await store.save(record("access-3"))
    late = asyncio.ensure_future(store.get("m1"))
    await asyncio.sleep(0.05)
    store.gate.set()

    await early
    late_record = await late
    assert late_record is not None
    assert late_record.access_token == "access-3"  # a read of its own, begun after the write
