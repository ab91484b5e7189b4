"""`JobJournal` in PostgreSQL: the same job life cycle as `SqliteJobJournal`, shared by all instances.

Every instance inserts the calls it accepts; only the leader (see services/leadership.py) claims
them. Claims still take `FOR UPDATE SKIP LOCKED` and a lease, so that two claimers can never get
the same job even for the moment when leadership changes hands.
"""

import logging
import time
from collections.abc import Sequence
from functools import partial
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from repositories.grouped_adds import GroupedAdds
from repositories.job_journal import RETRYING_AFTER, Job, JobState, NewJob, job_from_row, robot_run
from repositories.postgres import failure, with_retry
from schemas import QueueStats, RobotRun

logger = logging.getLogger(__name__)
_DAY = 86400.0


class PostgresJobJournal:
    def __init__(self, pool: AsyncConnectionPool[Any]) -> None:
        self._pool = pool
        # Group commit: the calls that arrive while an insert is in flight go in the next one.
        self._adds = GroupedAdds(lambda jobs: with_retry(self._pool, partial(_insert_many, jobs=jobs)))

    async def add(self, job: NewJob) -> tuple[int, bool]:
        """Store the job before the call's 200; concurrent calls share one statement and one commit.

        A round trip costs the app more CPU in the driver than the rest of the journal's work: one
        multi-row INSERT for all the calls that came in meanwhile keeps the cost per call low under
        load, and adds nothing when calls come one at a time.
        """
        return await self._adds.add(job)

    async def claim(self, limit: int, lease_seconds: float) -> list[Job]:
        now = time.time()
        rows = await self._fetch(
            "UPDATE jobs SET lease_until = %s WHERE id IN (SELECT id FROM jobs WHERE"
            " state IN ('add', 'send') AND next_attempt_at <= %s AND lease_until <= %s ORDER BY id LIMIT %s"
            " FOR UPDATE SKIP LOCKED) RETURNING *",
            (now + lease_seconds, now, now, limit),
        )
        return sorted((_job(row) for row in rows), key=lambda job: job.id)

    async def reclaim_leases(self) -> int:
        rows = await self._fetch(
            "UPDATE jobs SET lease_until = 0 WHERE state IN ('add', 'send') AND lease_until > %s"
            " RETURNING id",
            (time.time(),),
        )
        return len(rows)

    async def due_count(self, limit: int) -> int:
        now = time.time()
        rows = await self._fetch(
            "SELECT COUNT(*) AS n FROM (SELECT 1 FROM jobs WHERE state IN ('add', 'send')"
            " AND next_attempt_at <= %s AND lease_until <= %s LIMIT %s) AS due",
            (now, now, limit),
        )
        return int(rows[0]["n"])

    async def mark_add_attempted(self, ids: Sequence[int]) -> None:
        await self._execute_ids(
            "UPDATE jobs SET add_attempted = TRUE, updated_at = %s WHERE id = ANY(%s)", ids
        )

    async def release(self, ids: Sequence[int]) -> None:
        await self._execute_ids("UPDATE jobs SET lease_until = 0, updated_at = %s WHERE id = ANY(%s)", ids)

    async def to_send(self, updates: Sequence[tuple[int, int, str]]) -> None:
        now = time.time()
        await self._write_many(
            "UPDATE jobs SET state = 'send', contact_id = %s, error = %s, attempts = 0, updated_at = %s"
            " WHERE id = %s",
            [(contact_id, error, now, job_id) for job_id, contact_id, error in updates],
        )

    async def note_found(self, updates: Sequence[tuple[int, str]]) -> None:
        now = time.time()
        await self._write_many(
            "UPDATE jobs SET found_note = %s, updated_at = %s WHERE id = %s",
            [(note, now, job_id) for job_id, note in updates],
        )

    async def retry_later(self, updates: Sequence[tuple[int, float, str]]) -> None:
        now = time.time()
        await self._write_many(
            "UPDATE jobs SET attempts = attempts + 1, next_attempt_at = %s, lease_until = 0,"
            " updated_at = %s, error = CASE WHEN state = 'add' THEN %s ELSE error END WHERE id = %s",
            [(now + delay, now, error, job_id) for job_id, delay, error in updates],
        )

    async def finish(self, updates: Sequence[tuple[int, JobState, str]]) -> None:
        now = time.time()
        await self._write_many(
            "UPDATE jobs SET state = %s, lease_until = 0, call_access_token = '', updated_at = %s,"
            " error = CASE WHEN %s = '' THEN error ELSE %s END WHERE id = %s",
            [(state, now, error, error, job_id) for job_id, state, error in updates],
        )

    async def next_due(self) -> float | None:
        rows = await self._fetch(
            "SELECT MIN(GREATEST(next_attempt_at, lease_until)) AS due FROM jobs"
            " WHERE state IN ('add', 'send')",
            (),
        )
        due = rows[0]["due"]
        return float(due) if due is not None else None

    async def check(self) -> str | None:
        # A durable write, as in the embedded journal: a server that answers but takes no writes
        # (read-only, a standby after a failover, a full disk) cannot accept robot calls.
        try:
            async with self._pool.connection() as conn, conn.transaction():
                await conn.execute(
                    "INSERT INTO health_probe (id, at) VALUES (1, %s)"
                    " ON CONFLICT (id) DO UPDATE SET at = EXCLUDED.at",
                    (time.time(),),
                )
        except Exception as exc:
            # /health answers anyone: the driver's text (hosts, roles, files) only in the log.
            logger.warning("The PostgreSQL job journal failed its health write: %s", exc)
            return f"The PostgreSQL job journal cannot be used: {failure(exc)}."
        return None

    async def stats(self) -> QueueStats:
        # The same figures as the embedded journal's `_stats`: /health's "degraded" reasons
        # (retrying, failed_last_day) and the status page's answered_with_error read them.
        now = time.time()
        rows = await self._fetch("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state", ())
        counts = {row["state"]: int(row["n"]) for row in rows}
        (row,) = await self._fetch(
            "SELECT (SELECT MIN(created_at) FROM jobs WHERE state IN ('add', 'send')) AS oldest,"
            " (SELECT COUNT(*) FROM jobs WHERE state IN ('add', 'send') AND attempts >= %s) AS retrying,"
            " (SELECT COUNT(*) FROM jobs WHERE state = 'failed' AND updated_at > %s) AS failed_last_day,"
            " (SELECT COUNT(*) FROM jobs WHERE state = 'done' AND (error != '' OR contact_id = 0))"
            " AS with_error",
            (RETRYING_AFTER, now - _DAY),
        )
        oldest = row["oldest"]
        return QueueStats(
            pending=counts.get("add", 0) + counts.get("send", 0),
            oldest_pending_age_seconds=round(now - oldest, 3) if oldest else None,
            done=counts.get("done", 0),
            failed=counts.get("failed", 0),
            abandoned=counts.get("abandoned", 0),
            retrying=int(row["retrying"]),
            failed_last_day=int(row["failed_last_day"]),
            answered_with_error=int(row["with_error"]),
        )

    async def recent(self, limit: int) -> list[RobotRun]:
        rows = await self._fetch("SELECT * FROM jobs ORDER BY id DESC LIMIT %s", (limit,))
        return [robot_run(row) for row in rows]

    async def close(self) -> None:
        """The pool belongs to the back end, which closes it."""

    async def _execute_ids(self, sql: str, ids: Sequence[int]) -> None:
        async with self._pool.connection() as conn:
            await conn.execute(sql, (time.time(), list(ids)))

    async def _write_many(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        # One transaction per kind of update, as in SQLite: a pass's outcome lands all at once.
        async with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cursor:
            await cursor.executemany(sql, rows)

    async def _fetch(self, sql: str, params: tuple[Any, ...]) -> list[dict[str, Any]]:
        async with self._pool.connection() as conn, conn.cursor(row_factory=dict_row) as cursor:
            await cursor.execute(sql, params)
            rows: list[dict[str, Any]] = await cursor.fetchall()
            return rows


# A group of calls is one statement, so one round trip: on the pool's autocommit connections it is
# its own transaction, and the driver returns only after the server's ReadyForQuery, which follows
# the commit, so a call is still acknowledged only once its row is committed. BEGIN and COMMIT
# around it cost two more round trips, each about as much of the app's CPU as the INSERT itself.
# The join sees the statement's snapshot: the rows that were there before (the duplicates), never
# the ones this INSERT adds. The arrays go in binary (%b): psycopg's text dumping of ten arrays
# (quoting every element, JSON included) cost the app more CPU than the rest of the statement.
_INSERT = (
    "WITH t AS (SELECT * FROM unnest(%(tokens)b::text[], %(members)b::text[], %(workflows)b::text[],"
    " %(documents)b::text[], %(properties)b::jsonb[], %(errors)b::text[], %(endpoints)b::text[],"
    " %(call_tokens)b::text[], %(answers)b::bool[], %(deadlines)b::float8[]) AS u(event_token)),"
    " added AS (INSERT INTO jobs (event_token, member_id, workflow_id, document_id, properties, error,"
    " client_endpoint, call_access_token, wants_answer, deadline, state, next_attempt_at, created_at,"
    " updated_at) SELECT t.*, 'add', %(now)s, %(now)s, %(now)s FROM t"
    " ON CONFLICT (event_token) DO NOTHING RETURNING event_token, id)"
    " SELECT event_token, id, TRUE FROM added"
    " UNION ALL SELECT event_token, jobs.id, FALSE FROM t JOIN jobs USING (event_token)"
)


async def _insert_many(conn: AsyncConnection[Any], jobs: list[NewJob]) -> tuple[dict[str, int], set[str]]:
    """(event_token → id for every job, the event tokens inserted now); known tokens are kept."""
    params = {
        "tokens": [job.event_token for job in jobs],
        "members": [job.member_id for job in jobs],
        "workflows": [job.workflow_id for job in jobs],
        "documents": [job.document_id for job in jobs],
        "properties": [Jsonb(job.properties) for job in jobs],
        "errors": [job.error for job in jobs],
        "endpoints": [job.client_endpoint for job in jobs],
        "call_tokens": [job.call_access_token for job in jobs],
        "answers": [job.wants_answer for job in jobs],
        "deadlines": [job.deadline for job in jobs],
        "now": time.time(),
    }
    cursor = await conn.execute(_INSERT, params)
    ids: dict[str, int] = {}
    inserted: set[str] = set()
    for token, job_id, created in await cursor.fetchall():
        ids[token] = int(job_id)
        if created:
            inserted.add(token)
    missing = [job.event_token for job in jobs if job.event_token not in ids]
    if missing:  # inserted by another instance after this statement's snapshot: committed by now
        cursor = await conn.execute(
            "SELECT event_token, id FROM jobs WHERE event_token = ANY(%s)", (missing,)
        )
        ids.update({row[0]: int(row[1]) for row in await cursor.fetchall()})
    return ids, inserted


def _job(row: dict[str, Any]) -> Job:
    return job_from_row(row, row["properties"])
