"""The journal's own guarantees: FULL commits, group commit, one owner per file, reclaiming."""

import asyncio
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from repositories.job_journal import NewJob, SqliteJobJournal
from repositories.oauth_state_store import SqliteOAuthStateStore
from repositories.sqlite_db import SqliteDatabase, open_database, transaction

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
def database(tmp_path: Path) -> Iterator[SqliteDatabase]:
    db = SqliteDatabase(tmp_path / "jobs.sqlite3")
    yield db
    db.close()


async def test_commits_reach_the_disk_before_they_return(database: SqliteDatabase) -> None:
    level = database.run_now(lambda conn: conn.execute("PRAGMA synchronous").fetchone()[0])

    assert level == 2  # FULL: the WAL is fsynced at each commit; a power cut loses nothing acknowledged


async def test_calls_that_arrive_together_share_one_commit(database: SqliteDatabase) -> None:
    journal = SqliteJobJournal(database)
    commits: list[str] = []
    database.run_now(lambda conn: conn.set_trace_callback(lambda sql: commits.append(sql)))

    results = await asyncio.gather(*(journal.add(new_job(i)) for i in range(100)))

    assert all(created for _, created in results)
    assert len({job_id for job_id, _ in results}) == 100
    assert 1 <= sum(sql == "COMMIT" for sql in commits) <= 10
    again = await asyncio.gather(journal.add(new_job(7)), journal.add(new_job(7)))
    assert list(again) == [(results[7][0], False), (results[7][0], False)]


async def test_a_second_owner_of_the_same_file_is_refused(database: SqliteDatabase) -> None:
    # It would open the file behind the first one's back and drop its POSIX locks.
    with pytest.raises(RuntimeError, match="already open"):
        SqliteDatabase(database.path)


async def test_opening_an_open_file_again_shares_it(tmp_path: Path) -> None:
    first = open_database(tmp_path / "jobs.sqlite3")
    second = open_database(tmp_path / "jobs.sqlite3")
    assert second is first
    second.close()
    assert first.run_now(lambda conn: conn.execute("SELECT 1").fetchone()[0]) == 1  # still open
    first.close()
    third = open_database(tmp_path / "jobs.sqlite3")
    assert third is not first
    third.close()


async def test_journal_and_oauth_states_share_the_one_database(database: SqliteDatabase) -> None:
    journal = SqliteJobJournal(database)
    states = SqliteOAuthStateStore(database)

    await states.put("state", "nonce", "https://portal.example", 60)
    await journal.add(new_job(1))

    assert await states.take("state", "nonce") == "https://portal.example"
    assert await states.take("state", "nonce") is None
    with sqlite3.connect(database.path) as other:
        assert other.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 1


async def test_a_new_leader_reclaims_every_lease_at_once(database: SqliteDatabase) -> None:
    journal = SqliteJobJournal(database)
    for i in range(3):
        await journal.add(new_job(i))
    assert len(await journal.claim(10, lease_seconds=3600)) == 3
    assert await journal.claim(10, lease_seconds=3600) == []

    assert await journal.reclaim_leases() == 3

    assert len(await journal.claim(10, lease_seconds=3600)) == 3


async def test_a_failure_that_is_no_storage_error_rolls_its_transaction_back(
    database: SqliteDatabase,
) -> None:
    # Not an sqlite3 error (a bug, a bad value): the transaction must not stay open, or every
    # later BEGIN on the one shared connection fails and the journal is stuck until a restart.
    journal = SqliteJobJournal(database)

    def half_done(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO health_probe (id, at) VALUES (1, 0)")
        raise ValueError("a bug")

    with pytest.raises(ValueError, match="a bug"):
        await database.run(lambda conn: transaction(conn, half_done))
    assert (await journal.add(NewJob("t1", "m", "w", "d", time.time() + 60, {})))[1] is True
    assert (
        await database.run(lambda conn: conn.execute("SELECT COUNT(*) FROM health_probe").fetchone()[0]) == 0
    )
