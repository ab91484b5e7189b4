"""The repository protocols, checked once against each back end (embedded files, PostgreSQL)."""

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography.fernet import Fernet

from config import Settings
from repositories.job_journal import NewJob
from repositories.token_store import TokenKeyMismatch, TokenStoreError
from schemas import PortalTokens
from services.backend import Backend, open_backend
from tests.storage_faults import TinyTmpfs

pytestmark = pytest.mark.anyio


def backend_settings(tmp_path: Path, database_url: str | None, **values: Any) -> Settings:
    values = {"token_file": tmp_path / "tokens.json", "job_db_file": tmp_path / "jobs.sqlite3", **values}
    values["database_url"] = database_url
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.fixture
async def stores(tmp_path: Path, database_url: str | None) -> AsyncIterator[Backend]:
    async with open_backend(backend_settings(tmp_path, database_url)) as opened:
        yield opened


def record(member_id: str = "m1", access: str = "access-1", refresh: str = "refresh-1") -> PortalTokens:
    return PortalTokens(
        member_id=member_id,
        domain="example.bitrix24.ru",
        client_endpoint="https://example.bitrix24.ru/rest/",
        access_token=access,
        refresh_token=refresh,
        application_token="app-token-1",
        expires_at=time.time() + 3600,
    )


def new_job(token: str, member_id: str = "m1") -> NewJob:
    return NewJob(
        event_token=token,
        member_id=member_id,
        workflow_id="wf",
        document_id="doc",
        deadline=time.time() + 600,
        properties={"first_name": "Иван", "nested": {"a": [1, 2]}},
    )


def stored_text(tmp_path: Path, database_url: str | None) -> str:
    """Everything the back end holds about tokens, as a backup of it would."""
    if database_url is None:
        return (tmp_path / "tokens.json").read_text()
    with psycopg.connect(database_url) as conn:
        return json.dumps(conn.execute("SELECT member_id, record::text FROM portal_tokens").fetchall())


# --- tokens ------------------------------------------------------------------------------------


async def test_tokens_round_trip(stores: Backend) -> None:
    assert await stores.tokens.get("m1") is None
    await stores.tokens.save(record())
    await stores.tokens.save(record("m2"))
    await stores.tokens.save(record(access="access-2"))
    got = await stores.tokens.get("m1", fresh=True)
    assert got is not None
    assert got.access_token == "access-2"
    assert got.application_token == "app-token-1"
    assert sorted(r.member_id for r in await stores.tokens.list()) == ["m1", "m2"]
    await stores.tokens.delete("m1")
    assert await stores.tokens.get("m1") is None
    assert [r.member_id for r in await stores.tokens.list()] == ["m2"]


async def test_refresh_lock_admits_one_holder_at_a_time_across_instances(
    tmp_path: Path, database_url: str | None
) -> None:
    settings = backend_settings(tmp_path, database_url)
    async with open_backend(settings) as first, open_backend(settings) as second:
        await first.tokens.save(record(refresh="0"))

        async def refresh(backend: Backend) -> None:
            # Read, wait (the grant's round trip), write the next pair: a lost update shows as a
            # counter below the number of refreshes.
            async with backend.tokens.refresh_lock("m1"):
                current = await backend.tokens.get("m1", fresh=True)
                assert current is not None
                assert current.refresh_token is not None
                await asyncio.sleep(0.01)
                await backend.tokens.save(
                    current.model_copy(update={"refresh_token": str(int(current.refresh_token) + 1)})
                )

        await asyncio.gather(*(refresh((first, second)[n % 2]) for n in range(10)))
        # Each save inside the lock is committed: the other instance reads it outside the lock.
        for backend in (first, second):
            seen = await backend.tokens.get("m1", fresh=True)
            assert seen is not None
            assert seen.refresh_token == "10"


async def test_tokens_encrypted_at_rest_and_a_wrong_key_never_overwrites(
    tmp_path: Path, database_url: str | None
) -> None:
    key = Fernet.generate_key().decode()
    async with open_backend(backend_settings(tmp_path, database_url, token_encryption_key=key)) as b:
        await b.tokens.save(record())
        got = await b.tokens.get("m1")
        assert got is not None
        assert (got.access_token, got.refresh_token) == ("access-1", "refresh-1")
    backup = stored_text(tmp_path, database_url)
    assert not [s for s in ("access-1", "refresh-1", "app-token-1") if s in backup]

    for other in (Fernet.generate_key().decode(), None):
        async with open_backend(backend_settings(tmp_path, database_url, token_encryption_key=other)) as b:
            with pytest.raises(TokenKeyMismatch, match="TOKEN_ENCRYPTION_KEY"):
                await b.tokens.list()
            if database_url is None:  # the file store refuses to write beside what it cannot read
                with pytest.raises(TokenKeyMismatch):
                    await b.tokens.save(record("m2"))
    assert stored_text(tmp_path, database_url) == backup


async def test_plain_tokens_stay_readable_when_a_key_is_added(
    tmp_path: Path, database_url: str | None
) -> None:
    async with open_backend(backend_settings(tmp_path, database_url)) as b:
        await b.tokens.save(record())
    key = Fernet.generate_key().decode()
    async with open_backend(backend_settings(tmp_path, database_url, token_encryption_key=key)) as b:
        got = await b.tokens.get("m1")
        assert got is not None
        assert got.refresh_token == "refresh-1"
        await b.tokens.save(got)
    assert "refresh-1" not in stored_text(tmp_path, database_url)


# --- the job journal ---------------------------------------------------------------------------


async def test_journal_stores_each_event_token_once(stores: Backend) -> None:
    first = await stores.journal.add(new_job("t1"))
    again = await stores.journal.add(new_job("t1"))
    assert first[1] is True
    assert again == (first[0], False)
    claimed = await stores.journal.claim(10, 60)
    assert [job.event_token for job in claimed] == ["t1"]
    assert claimed[0].properties == {"first_name": "Иван", "nested": {"a": [1, 2]}}


async def test_concurrent_adds_store_each_event_token_once(stores: Backend) -> None:
    # 60 calls at once, each of 20 event tokens three times (redeliveries racing the first).
    results = await asyncio.gather(*(stores.journal.add(new_job(f"t{i % 20}")) for i in range(60)))
    by_token: dict[str, set[int]] = {}
    created: dict[str, int] = {}
    for i, (job_id, new) in enumerate(results):
        by_token.setdefault(f"t{i % 20}", set()).add(job_id)
        created[f"t{i % 20}"] = created.get(f"t{i % 20}", 0) + int(new)
    assert all(len(ids) == 1 for ids in by_token.values())
    assert len({next(iter(ids)) for ids in by_token.values()}) == 20
    assert set(created.values()) == {1}
    assert await stores.journal.due_count(100) == 20


async def test_a_redelivery_between_new_calls_of_one_group_leaves_them_new(stores: Backend) -> None:
    # A redelivered token in the middle of a group: SQLite's AUTOINCREMENT spends an id on the
    # skipped row, so the new rows' ids are not consecutive. Both new calls are still new.
    old_id, _ = await stores.journal.add(new_job("old"))
    tokens = ["a", "old", "b", "x", "x", "c"]
    results = await asyncio.gather(*(stores.journal.add(new_job(token)) for token in tokens))
    assert [created for _, created in results] == [True, False, True, True, False, True]
    assert results[1][0] == old_id
    assert results[3][0] == results[4][0]
    claimed = await stores.journal.claim(10, 60)
    assert sorted(job.event_token for job in claimed) == ["a", "b", "c", "old", "x"]


async def test_a_group_larger_than_one_statement_stores_every_call(stores: Backend) -> None:
    # 300 calls at once: more rows than one INSERT carries; some already stored, some twice.
    await asyncio.gather(*(stores.journal.add(new_job(f"old{i}")) for i in range(5)))
    tokens = [f"new{i}" for i in range(290)] + [f"old{i}" for i in range(5)] + [f"new{i}" for i in range(5)]
    results = await asyncio.gather(*(stores.journal.add(new_job(token)) for token in tokens))
    ids = dict(zip(tokens, (job_id for job_id, _ in results), strict=True))
    assert sum(created for _, created in results) == 290
    assert len(set(ids.values())) == 295
    claimed = await stores.journal.claim(400, 60)
    assert {job.id: job.event_token for job in claimed} == {job_id: token for token, job_id in ids.items()}


async def test_journal_life_cycle(stores: Backend) -> None:
    ids = [(await stores.journal.add(new_job(f"t{i}")))[0] for i in range(3)]
    assert await stores.journal.due_count(10) == 3
    claimed = await stores.journal.claim(2, 60)
    assert [job.id for job in claimed] == ids[:2]
    assert [job.id for job in await stores.journal.claim(10, 60)] == ids[2:]
    assert await stores.journal.claim(10, 60) == []  # leased
    await stores.journal.mark_add_attempted(ids[:1])
    await stores.journal.to_send([(ids[0], 42, "")])
    await stores.journal.retry_later([(ids[1], 0.0, "portal busy")])
    await stores.journal.finish([(ids[2], "failed", "gave up")])
    again = {job.id: job for job in await stores.journal.claim(10, 60)}
    assert sorted(again) == [ids[1]]
    assert again[ids[1]].attempts == 1
    assert again[ids[1]].error == "portal busy"
    await stores.journal.release([ids[1]])
    await stores.journal.reclaim_leases()
    resumed = {job.id: job for job in await stores.journal.claim(10, 60)}
    assert sorted(resumed) == ids[:2]
    assert resumed[ids[0]].state == "send"
    assert resumed[ids[0]].contact_id == 42
    assert resumed[ids[0]].add_attempted
    await stores.journal.finish([(ids[0], "done", ""), (ids[1], "abandoned", "")])
    stats = await stores.journal.stats()
    assert (stats.pending, stats.done, stats.failed, stats.abandoned) == (0, 1, 1, 1)
    assert await stores.journal.next_due() is None
    recent = await stores.journal.recent(2)
    assert [run.job_id for run in recent] == [ids[2], ids[1]]


async def test_a_new_leader_reclaims_every_lease(stores: Backend) -> None:
    for i in range(3):
        await stores.journal.add(new_job(f"t{i}"))
    assert len(await stores.journal.claim(10, 3600)) == 3
    assert await stores.journal.reclaim_leases() == 3
    assert len(await stores.journal.claim(10, 3600)) == 3


# --- OAuth states ------------------------------------------------------------------------------


async def test_oauth_state_is_single_use_and_bound_to_the_browser(stores: Backend) -> None:
    await stores.states.put("s1", "nonce", "https://example.bitrix24.ru", 60)
    await stores.states.put("s2", "nonce", "https://example.bitrix24.ru", 60)
    await stores.states.put("s3", "nonce", "https://example.bitrix24.ru", -1)
    assert await stores.states.take("s1", "nonce") == "https://example.bitrix24.ru"
    assert await stores.states.take("s1", "nonce") is None
    assert await stores.states.take("s2", "another browser") is None
    assert await stores.states.take("s2", "nonce") is None
    assert await stores.states.take("s3", "nonce") is None


async def test_status_names_the_back_end_and_the_worker_leader(stores: Backend) -> None:
    status = await stores.cluster_status()
    assert status.backend == ("embedded" if stores.pool is None else "postgresql")
    assert status.instance == stores.instance_id


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("token_encryption_key", "not-a-key-s3cr3t", "is not a Fernet key"),
        ("database_url", "mysql://robot:s3cr3t@db/robot", "must look like postgresql://"),
    ],
)
def test_a_malformed_key_or_url_is_refused_without_echoing_it(name: str, value: str, message: str) -> None:
    values: dict[str, Any] = {name: value}
    with pytest.raises(ValueError, match=message) as refused:
        Settings(_env_file=None, **values)  # type: ignore[call-arg]
    assert "s3cr3t" not in str(refused.value)


class WriteRefusal:
    """Makes a back end refuse token writes while reads still work, then take them again.

    Embedded: the token file on a tiny tmpfs, filled up (ENOSPC from the kernel).
    PostgreSQL: a trigger on the token table that raises, as a full or failing server would.
    """

    def __init__(self, disk: TinyTmpfs, database_url: str | None) -> None:
        self.disk, self.database_url = disk, database_url

    def _sql(self, sql: str) -> None:
        assert self.database_url is not None
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            conn.execute(sql.encode())

    def refuse(self) -> None:
        if self.database_url is None:
            self.disk.fill()
            return
        self._sql(
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS"
            " $$ BEGIN RAISE EXCEPTION 'could not extend file: No space left on device'; END $$;"
            " CREATE TRIGGER refuse BEFORE INSERT OR UPDATE ON portal_tokens"
            " FOR EACH ROW EXECUTE FUNCTION refuse()"
        )

    def allow(self) -> None:
        if self.database_url is None:
            self.disk.free()
            return
        self._sql("DROP TRIGGER refuse ON portal_tokens")


async def test_a_rotated_pair_the_store_refuses_is_kept_and_stored_later(
    tmp_path: Path, database_url: str | None
) -> None:
    with TinyTmpfs(tmp_path / "disk") as disk:
        settings = backend_settings(tmp_path, database_url, token_file=disk.path / "tokens.json")
        refusal = WriteRefusal(disk, database_url)
        async with open_backend(settings) as b:
            await b.tokens.save(record())
            refusal.refuse()
            rotated = record(access="access-2", refresh="refresh-2")
            async with b.tokens.refresh_lock("m1"):
                await b.tokens.save_rotated(rotated)  # refused, and kept: not raised, not lost
            assert "m1" in b.tokens.unsaved()
            got = await b.tokens.get("m1", fresh=True)
            assert got is not None
            assert got.refresh_token == "refresh-2"
            assert [r.refresh_token for r in await b.tokens.list()] == ["refresh-2"]
            with pytest.raises(TokenStoreError):
                await b.tokens.flush()
            refusal.allow()
            await b.tokens.flush()
            assert b.tokens.unsaved() == {}
        async with open_backend(settings) as again:  # what a restart (or another instance) reads
            stored = await again.tokens.get("m1", fresh=True)
            assert stored is not None
            assert stored.refresh_token == "refresh-2"


# --- what the other protocols' users read back (same answer on both back ends) ------------------


async def test_a_call_that_wants_no_answer_is_journaled_as_such(stores: Backend) -> None:
    # use_subscription=N (services/processing.py): the worker must not answer that workflow.
    await stores.journal.add(NewJob(**{**new_job("quiet").__dict__, "wants_answer": False}))
    await stores.journal.add(new_job("waits"))
    claimed = {job.event_token: job.wants_answer for job in await stores.journal.claim(10, 60)}
    assert claimed == {"quiet": False, "waits": True}


async def test_stats_count_failing_jobs_and_answers_with_an_error(stores: Backend) -> None:
    # /health's "degraded" and the status page read these figures on either back end.
    ids = [(await stores.journal.add(new_job(f"t{i}")))[0] for i in range(3)]
    for _ in range(3):
        await stores.journal.retry_later([(ids[0], 0.0, "portal busy")])
    await stores.journal.finish([(ids[1], "failed", "gave up"), (ids[2], "done", "bad e-mail")])
    stats = await stores.journal.stats()
    assert (stats.retrying, stats.failed_last_day, stats.answered_with_error) == (1, 1, 1)


async def test_recent_runs_name_their_document(stores: Backend) -> None:
    # The status page links each run to its CRM item by document_id.
    await stores.journal.add(new_job("t1"))
    assert [run.document_id for run in await stores.journal.recent(1)] == ["doc"]


@pytest.mark.parametrize("backend", ["postgresql"])
async def test_moving_to_postgresql_keeps_what_each_job_must_answer(
    tmp_path: Path, database_url: str
) -> None:
    # repositories.migrate_to_postgres: a job that wants no answer, and a found contact's note
    # (duplicate=Y in the answer), must mean the same after the move.
    from repositories.migrate_to_postgres import copy_jobs
    from repositories.postgres import open_pool

    async with open_backend(backend_settings(tmp_path, None)) as embedded:
        _quiet, _ = await embedded.journal.add(NewJob(**{**new_job("quiet").__dict__, "wants_answer": False}))
        found, _ = await embedded.journal.add(new_job("found"))
        await embedded.journal.note_found([(found, "Found contact 7 by phone.")])
        await embedded.journal.to_send([(found, 7, "")])
    async with open_backend(backend_settings(tmp_path / "pg", database_url)) as moved:
        pool = await open_pool(database_url, max_size=2)
        try:
            assert await copy_jobs(pool, tmp_path / "jobs.sqlite3") == (2, 0)
        finally:
            await pool.close()
        jobs = {job.event_token: job for job in await moved.journal.claim(10, 60)}
    assert jobs["quiet"].wants_answer is False
    assert (jobs["found"].state, jobs["found"].found_note) == ("send", "Found contact 7 by phone.")


@pytest.mark.parametrize("backend", ["postgresql"])
async def test_a_database_that_takes_no_writes_is_reported(tmp_path: Path, database_url: str) -> None:
    # /health is "down" when the journal cannot take a write (interface.md): a server that
    # answers but is read-only (a standby after a failover, a full disk) must say so.
    async with open_backend(backend_settings(tmp_path, database_url)) as stores:
        assert stores.pool is not None
        assert await stores.journal.check() is None
        name = database_url.rsplit("/", 1)[1]
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
        await stores.pool.drain()  # new sessions take the setting, as after a failover
        reason = await stores.journal.check()
        assert reason is not None
        assert "read-only" in reason


async def test_recording_the_robot_keeps_a_pair_another_instance_just_rotated(
    tmp_path: Path, database_url: str | None
) -> None:
    # RobotRegistration (and the status page's language) write fields beside the tokens: with a
    # copy read before another instance rotated the pair, the spent refresh token came back and
    # the portal was disconnected at its next refresh.
    from typing import cast

    from services.retry import RetryPolicy
    from services.robot_registration import RobotRegistration

    settings = backend_settings(tmp_path, database_url)
    async with open_backend(settings) as first, open_backend(settings) as second:
        await first.tokens.save(record())
        assert await second.tokens.get("m1") is not None  # the second instance has read it
        async with first.tokens.refresh_lock("m1"):
            await first.tokens.save_rotated(record(access="access-2", refresh="refresh-2"))
        robots = RobotRegistration(settings, second.tokens, cast(Any, None), RetryPolicy())
        await robots._record("m1", None)
        stored = await first.tokens.get("m1", fresh=True)
        assert stored is not None
        assert stored.robot_registered_at is not None
        assert stored.refresh_token == "refresh-2"
