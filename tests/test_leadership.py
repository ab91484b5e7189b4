"""Worker leadership on PostgreSQL: one holder, freed when its session dies, noticed by the loser."""

import asyncio
from contextlib import AsyncExitStack

import pytest

from services.leadership import PostgresLeadership
from tests.pg_server import TestPostgres

pytestmark = pytest.mark.anyio


async def test_one_leader_and_a_takeover_when_its_session_dies(pg_server: TestPostgres) -> None:
    url = pg_server.new_database()
    first, second = PostgresLeadership(url, "host-a:1:aaaaaa"), PostgresLeadership(url, "host-b:2:bbbbbb")
    async with AsyncExitStack() as stack:
        lost_first = await stack.enter_async_context(first.hold())
        assert first.leading
        waiting = asyncio.create_task(stack.enter_async_context(second.hold()))
        await asyncio.sleep(2.5)  # more than two polls: the lock is held, the second must wait
        assert not waiting.done()
        assert not second.leading

        # The server ends the leader's session, as when its process or host dies.
        pg_server.psql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = 'host-a:1:aaaaaa'"
        )
        lost_second = await asyncio.wait_for(waiting, timeout=20)
        assert second.leading
        await asyncio.wait_for(lost_first.wait(), timeout=20)  # the old leader knows it lost
        assert not lost_second.is_set()
