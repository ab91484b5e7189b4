"""The PostgreSQL journal's group commit, against a real server: calls that arrive together share
one statement and one commit, and each is acknowledged only once its row is committed."""

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from repositories.job_journal import NewJob
from repositories.pg_job_journal import PostgresJobJournal
from repositories.postgres import migrate, open_pool
from tests.pg_server import TestPostgres

pytestmark = pytest.mark.anyio


def new_job(index: int) -> NewJob:
    return NewJob(
        event_token=f"wf{index}|A1|token{index}",
        member_id="member",
        workflow_id=f"wf{index}",
        document_id="crm/CCrmDocumentDeal/DEAL_1",
        deadline=time.time() + 600,
        properties={"first_name": f"Ivan{index}"},
    )


@pytest.fixture
def url(pg_server: TestPostgres) -> str:
    return pg_server.new_database()


@pytest.fixture
async def pool(url: str) -> AsyncIterator[AsyncConnectionPool[Any]]:
    opened = await open_pool(url)
    try:
        await migrate(opened)
        yield opened
    finally:
        await opened.close()


def transactions_and_rows(url: str) -> tuple[int, int]:
    """How many transactions wrote the jobs (rows one transaction wrote share its xmin), how many rows."""
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT COUNT(DISTINCT xmin::text), COUNT(*) FROM jobs").fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


async def test_calls_that_arrive_together_share_one_commit(pool: AsyncConnectionPool[Any], url: str) -> None:
    journal = PostgresJobJournal(pool)

    results = await asyncio.gather(*(journal.add(new_job(i)) for i in range(100)))

    assert all(created for _, created in results)
    assert len({job_id for job_id, _ in results}) == 100
    commits, rows = transactions_and_rows(url)  # another connection: every acknowledged row is there
    assert rows == 100
    assert 1 <= commits <= 10
    again = await asyncio.gather(journal.add(new_job(7)), journal.add(new_job(7)))
    assert list(again) == [(results[7][0], False), (results[7][0], False)]


async def test_a_call_one_turn_of_the_event_loop_later_joins_the_group(
    pool: AsyncConnectionPool[Any], url: str
) -> None:
    journal = PostgresJobJournal(pool)

    async def one_turn_later(index: int) -> tuple[int, bool]:
        await asyncio.sleep(0)  # its bytes came in one poll of the sockets after the first call's
        return await journal.add(new_job(index))

    results = await asyncio.gather(journal.add(new_job(0)), one_turn_later(1))

    assert [created for _, created in results] == [True, True]
    assert transactions_and_rows(url) == (1, 2)


async def test_a_group_mixing_new_calls_and_calls_another_instance_stored(
    pool: AsyncConnectionPool[Any], url: str
) -> None:
    other = PostgresJobJournal(pool)  # another instance's journal on the same database
    stored = await asyncio.gather(*(other.add(new_job(i)) for i in range(0, 10, 2)))
    journal = PostgresJobJournal(pool)

    results = await asyncio.gather(*(journal.add(new_job(i)) for i in range(10)))

    assert [created for _, created in results] == [i % 2 == 1 for i in range(10)]
    assert [results[i][0] for i in range(0, 10, 2)] == [job_id for job_id, _ in stored]
    assert len({job_id for job_id, _ in results}) == 10
    assert transactions_and_rows(url)[1] == 10
