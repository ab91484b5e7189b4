"""The durable job journal: every robot call the app has acknowledged, until its workflow is answered.

A job moves `add` (create the contact) → `send` (answer the workflow) → `done`; or ends `abandoned`
(the workflow is gone) or `failed` (its workflow stopped waiting). `SqliteJobJournal` is the
embedded default: SQLite in WAL mode with `synchronous=FULL` (an acknowledged call survives a
power cut), on the `SqliteDatabase` it shares with the OAuth state store. Inserts are group
committed: the calls that arrive while one commit is on its way to disk share the next one.
The worker claims jobs with a lease (claiming again renews it); a new leader reclaims every
lease at once, since their holder is gone.
"""

import itertools
import json
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal, Protocol

from pydantic_core import to_json

from repositories.grouped_adds import GroupedAdds, Stored
from repositories.sqlite_db import SqliteDatabase, transaction
from schemas import QueueStats, RobotRun

JobState = Literal["add", "send", "done", "failed", "abandoned"]
TERMINAL: tuple[JobState, ...] = ("done", "failed", "abandoned")
RETRYING_AFTER = 3  # failed attempts in a row after which a pending job counts as failing
_DAY = 86400.0


@dataclass(frozen=True)
class NewJob:
    """An accepted robot call, as the worker needs it later."""

    event_token: str
    member_id: str
    workflow_id: str
    document_id: str
    deadline: float  # until when the workflow waits for the answer (unix time)
    properties: dict[str, Any]  # the robot's inputs as the portal sent them
    error: str = ""
    # The call's own token and endpoint: a last way to answer the workflow if ours are dead.
    client_endpoint: str = ""
    call_access_token: str = ""
    # False when the call said use_subscription=N: the workflow did not wait, so no answer is sent.
    wants_answer: bool = True


@dataclass(frozen=True)
class Job(NewJob):
    id: int = 0
    state: JobState = "add"
    contact_id: int = 0
    attempts: int = 0
    add_attempted: bool = False
    created_at: float = field(default_factory=time.time)
    # Set when `contact_id` is an existing contact that was found: the workflow log line.
    found_note: str = ""


class JobJournal(Protocol):
    """Every method raises `StorageError` (503 `storage_error`) when its storage fails."""

    async def add(self, job: NewJob) -> tuple[int, bool]:
        """Store a job durably (on disk when this returns); returns (id, created).

        A known `event_token` is not stored twice. The robot call is acknowledged after this.
        """
        ...

    async def claim(self, limit: int, lease_seconds: float) -> list[Job]:
        """Up to `limit` due jobs whose lease has ended, leased to the caller for `lease_seconds`."""
        ...

    async def reclaim_leases(self) -> int:
        """End every lease (the worker that held them is gone: it lost leadership); how many."""
        ...

    async def due_count(self, limit: int) -> int:
        """How many jobs could be claimed now, counting no further than `limit`."""
        ...

    async def mark_add_attempted(self, ids: Sequence[int]) -> None: ...

    async def release(self, ids: Sequence[int]) -> None:
        """Give claimed jobs back at once (a clean shutdown), instead of when their lease ends."""
        ...

    async def to_send(self, updates: Sequence[tuple[int, int, str]]) -> None:
        """(job id, contact id, error): the contact step is over; answer the workflow next."""
        ...

    async def retry_later(self, updates: Sequence[tuple[int, float, str]]) -> None:
        """(job id, delay in seconds, error): try the current step again after the delay."""
        ...

    async def note_found(self, updates: Sequence[tuple[int, str]]) -> None:
        """(job id, note): the contact about to be recorded was found, not created. Written before
        `to_send`, so a job in `send` never lacks it."""
        ...

    async def finish(self, updates: Sequence[tuple[int, JobState, str]]) -> None:
        """(job id, final state, error): the job is over; a non-empty error replaces the stored one."""
        ...

    async def next_due(self) -> float | None: ...

    async def check(self) -> str | None:
        """Prove the storage takes a durable write now: None if it does, else why not.

        The reason is a sentence naming the storage and the cause; `/health` reports "down" with it.
        """
        ...

    async def stats(self) -> QueueStats: ...

    async def recent(self, limit: int) -> list[RobotRun]: ...

    async def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    event_token TEXT NOT NULL UNIQUE,
    member_id TEXT NOT NULL,
    workflow_id TEXT NOT NULL,
    document_id TEXT NOT NULL,
    properties TEXT NOT NULL,
    error TEXT NOT NULL DEFAULT '',
    client_endpoint TEXT NOT NULL DEFAULT '',
    call_access_token TEXT NOT NULL DEFAULT '',
    wants_answer INTEGER NOT NULL DEFAULT 1,
    state TEXT NOT NULL,
    contact_id INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    add_attempted INTEGER NOT NULL DEFAULT 0,
    deadline REAL NOT NULL,
    next_attempt_at REAL NOT NULL,
    lease_until REAL NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    found_note TEXT NOT NULL DEFAULT '',
    -- The random mark of the group insert that stored the row: how that insert tells the rows
    -- it created from tokens stored before (0: a row of an older version).
    batch INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_due ON jobs (state, next_attempt_at);
CREATE TABLE IF NOT EXISTS health_probe (id INTEGER PRIMARY KEY CHECK (id = 1), at REAL NOT NULL);
"""
_NEW_COLUMNS = (
    "event_token, member_id, workflow_id, document_id, properties, error, client_endpoint,"
    " call_access_token, wants_answer, deadline"
)
_ROW_VALUES = 10  # the columns above, from `_row`
# Rows per statement: 2 + 64 * 10 parameters stay below 999, the smallest limit any SQLite has
# had (SQLITE_MAX_VARIABLE_NUMBER), and a group of 32 connections' calls fits in one.
_ROWS_PER_INSERT = 64
# Every token's id, and whether this group's insert (mark ?2) stored it, in one row, so in one
# step: Python's sqlite3 lets go of the GIL for every step (every row) and then has to win it
# back from the busy event loop.
_IDS = (
    "SELECT json_group_array(json_array(event_token, id, batch = ?2)) FROM jobs"
    " WHERE event_token IN (SELECT value FROM json_each(?1))"
)


@lru_cache(maxsize=_ROWS_PER_INSERT)
def _insert_sql(rows: int) -> str:
    """One INSERT of `rows` jobs: ?1 is the time, ?2 the group's mark, then each row's values.

    A group is one statement with bound values, not one per row (each statement lets go of the
    GIL and has to win it back from the busy event loop) nor one over a JSON array (SQLite then
    parses every row's JSON once per column: twice the CPU, measured in the journal's thread).
    A token already stored is skipped. No RETURNING: it answers a row per step (see `_IDS`).
    """
    places = (
        ",".join(f"?{3 + row * _ROW_VALUES + column}" for column in range(_ROW_VALUES)) for row in range(rows)
    )
    values = ",".join(f"({row},'add',?1,?1,?1,?2)" for row in places)
    # Only numbered placeholders and our own column names go into the text: nothing from a call.
    return (
        f"INSERT INTO jobs ({_NEW_COLUMNS}, state, next_attempt_at, created_at, updated_at, batch)"  # noqa: S608
        f" VALUES {values} ON CONFLICT(event_token) DO NOTHING"
    )


class SqliteJobJournal:
    """`JobJournal` on the shared SQLite file."""

    def __init__(self, db: SqliteDatabase) -> None:
        self._db = db
        db.run_now(lambda conn: conn.executescript(_SCHEMA))
        db.run_now(_add_missing_columns)
        self._adds = GroupedAdds(self._insert_group)

    async def add(self, job: NewJob) -> tuple[int, bool]:
        # Group commit: with synchronous=FULL every commit waits for the disk, so the calls that
        # arrive while one commit is in flight are inserted together in the next, one fsync for all.
        return await self._adds.add(job)

    async def _insert_group(self, jobs: list[NewJob]) -> Stored:
        return await self._db.run(_inserter(jobs))

    async def claim(self, limit: int, lease_seconds: float) -> list[Job]:
        now = time.time()
        rows = await self._db.run(
            lambda conn: conn.execute(
                "UPDATE jobs SET lease_until = ? WHERE id IN (SELECT id FROM jobs WHERE state IN"
                " ('add', 'send') AND next_attempt_at <= ? AND lease_until <= ? ORDER BY id LIMIT ?)"
                " RETURNING *",
                (now + lease_seconds, now, now, limit),
            ).fetchall()
        )
        return sorted((_job(row) for row in rows), key=lambda job: job.id)

    async def reclaim_leases(self) -> int:
        def reclaim(conn: sqlite3.Connection) -> int:
            cursor = conn.execute(
                "UPDATE jobs SET lease_until = 0 WHERE state IN ('add', 'send') AND lease_until > ?",
                (time.time(),),
            )
            return cursor.rowcount

        return await self._db.run(reclaim)

    async def due_count(self, limit: int) -> int:
        now = time.time()
        row = await self._fetchone(
            "SELECT COUNT(*) FROM (SELECT 1 FROM jobs WHERE state IN ('add', 'send')"
            " AND next_attempt_at <= ? AND lease_until <= ? LIMIT ?)",
            (now, now, limit),
        )
        return int(row[0]) if row else 0

    async def mark_add_attempted(self, ids: Sequence[int]) -> None:
        await self._execute_many("UPDATE jobs SET add_attempted = 1, updated_at = ? WHERE id = ?", ids)

    async def release(self, ids: Sequence[int]) -> None:
        await self._execute_many("UPDATE jobs SET lease_until = 0, updated_at = ? WHERE id = ?", ids)

    async def to_send(self, updates: Sequence[tuple[int, int, str]]) -> None:
        now = time.time()
        await self._write_many(
            "UPDATE jobs SET state = 'send', contact_id = ?, error = ?, attempts = 0, updated_at = ?"
            " WHERE id = ?",
            [(contact_id, error, now, job_id) for job_id, contact_id, error in updates],
        )

    async def retry_later(self, updates: Sequence[tuple[int, float, str]]) -> None:
        now = time.time()
        await self._write_many(
            "UPDATE jobs SET attempts = attempts + 1, next_attempt_at = ?, lease_until = 0,"
            " updated_at = ?, error = CASE WHEN state = 'add' THEN ? ELSE error END WHERE id = ?",
            [(now + delay, now, error, job_id) for job_id, delay, error in updates],
        )

    async def note_found(self, updates: Sequence[tuple[int, str]]) -> None:
        now = time.time()
        await self._write_many(
            "UPDATE jobs SET found_note = ?, updated_at = ? WHERE id = ?",
            [(note, now, job_id) for job_id, note in updates],
        )

    async def finish(self, updates: Sequence[tuple[int, JobState, str]]) -> None:
        now = time.time()
        await self._write_many(
            "UPDATE jobs SET state = ?, lease_until = 0, call_access_token = '', updated_at = ?,"
            " error = CASE WHEN ? = '' THEN error ELSE ? END WHERE id = ?",
            [(state, now, error, error, job_id) for job_id, state, error in updates],
        )

    async def next_due(self) -> float | None:
        row = await self._fetchone(
            "SELECT MIN(MAX(next_attempt_at, lease_until)) AS due FROM jobs WHERE state IN ('add', 'send')",
            (),
        )
        return float(row["due"]) if row and row["due"] is not None else None

    async def check(self) -> str | None:
        def probe(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT OR REPLACE INTO health_probe (id, at) VALUES (1, ?)", (time.time(),))

        try:
            await self._db.run(lambda conn: transaction(conn, probe))
        except Exception as exc:  # StorageError names the file; anything else is as bad
            return str(exc)
        return None

    async def stats(self) -> QueueStats:
        return await self._db.run(_stats)

    async def recent(self, limit: int) -> list[RobotRun]:
        rows = await self._db.run(
            lambda conn: conn.execute("SELECT * FROM jobs ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        )
        return [robot_run(row) for row in rows]

    async def close(self) -> None:
        """Let the inserts on their way finish; the shared database is closed by its owner."""
        await self._adds.close()

    async def _execute_many(self, sql: str, ids: Sequence[int]) -> None:
        now = time.time()
        await self._write_many(sql, [(now, job_id) for job_id in ids])

    async def _write_many(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        await self._db.run(lambda conn: transaction(conn, lambda c: c.executemany(sql, rows)))

    async def _fetchone(self, sql: str, params: tuple[Any, ...]) -> sqlite3.Row | None:
        rows = await self._db.run(lambda conn: conn.execute(sql, params).fetchall())
        return rows[0] if rows else None


def _add_column(db: sqlite3.Connection, definition: str) -> None:
    try:
        db.execute(f"ALTER TABLE jobs ADD COLUMN {definition}")
    except sqlite3.OperationalError as exc:
        if "duplicate column" not in str(exc):  # another process added it a moment ago
            raise


_Rows = list[tuple[Any, ...]]  # the values of jobs, as `_row` gives them


def _inserter(jobs: list[NewJob]) -> Callable[[sqlite3.Connection], Stored]:
    """Insert the group (known tokens skipped): every job's id, and the tokens it stored.

    The rows this group stored are those with its mark; a token stored before, by anyone, keeps
    the mark of the insert that stored it. A group that fits one INSERT (up to 64 calls: 32
    connections' worth) is that INSERT, a transaction of its own (the connection autocommits: one
    commit, one fsync), and one lookup. No BEGIN, COMMIT or max(id) around them: every statement
    lets go of the GIL and waits to win it back from the busy event loop, and that wait, more than
    SQLite, was the journal's cost (the ack benchmark's method, this and the previous version in
    one run, 8 rounds, three times: 0.66 -> 0.73, 0.65 -> 0.77, 0.67 -> 0.74 of bare FastAPI). A
    larger group is one transaction: one fsync, and all of it or none.
    """
    rows = [_row(job) for job in jobs]

    def insert_all(conn: sqlite3.Connection) -> Stored:
        now, mark = time.time(), next(_marks)

        def insert_and_look_up(conn: sqlite3.Connection) -> Stored:
            _insert(conn, rows, now, mark)
            return _look_up(conn, rows, mark)

        if len(rows) > _ROWS_PER_INSERT:
            return transaction(conn, insert_and_look_up)
        # Should the storage fail in the instant between the two statements, the calls are
        # stored but answered 503, as after a crash between a commit and its reply: the worker
        # carries them out and a redelivery is answered as a duplicate. Taking the rows back
        # would be worse: another worker process may have answered a redelivery of one already.
        return insert_and_look_up(conn)

    return insert_all


def _insert(conn: sqlite3.Connection, rows: _Rows, now: float, mark: int) -> None:
    for start in range(0, len(rows), _ROWS_PER_INSERT):
        chunk = rows[start : start + _ROWS_PER_INSERT]
        conn.execute(_insert_sql(len(chunk)), [now, mark, *(value for row in chunk for value in row)])


def _look_up(conn: sqlite3.Connection, rows: _Rows, mark: int) -> Stored:
    found = json.loads(conn.execute(_IDS, (json.dumps([row[0] for row in rows]), mark)).fetchone()[0])
    return {token: job_id for token, job_id, _ in found}, {token for token, _, ours in found if ours}


def _first_mark() -> int:
    # From the OS, once a process: `random`'s global state would repeat marks after anyone's
    # `random.seed(x)`, and a repeated mark makes a redelivery look created.
    return secrets.randbits(62) + 1


_marks = itertools.count(_first_mark())


def _new_marks_after_fork() -> None:
    global _marks
    _marks = itertools.count(_first_mark())


os.register_at_fork(after_in_child=_new_marks_after_fork)


def _row(job: NewJob) -> tuple[Any, ...]:
    """A job's values in the order of `_NEW_COLUMNS`."""
    return (
        job.event_token,
        job.member_id,
        job.workflow_id,
        job.document_id,
        # pydantic-core's serialiser: 1 us for a robot call's inputs, json.dumps 8 us (timeit).
        # Compact, UTF-8 kept as it is; read back with json.loads like any other JSON.
        to_json(job.properties).decode(),
        job.error,
        job.client_endpoint,
        job.call_access_token,
        int(job.wants_answer),
        job.deadline,
    )


def _stats(conn: sqlite3.Connection) -> QueueStats:
    now = time.time()
    counts = dict(conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
    oldest, retrying = conn.execute(
        "SELECT MIN(created_at), COUNT(CASE WHEN attempts >= ? THEN 1 END) FROM jobs"
        " WHERE state IN ('add', 'send')",
        (RETRYING_AFTER,),
    ).fetchone()
    failed_last_day = conn.execute(
        "SELECT COUNT(*) FROM jobs WHERE state = 'failed' AND updated_at > ?", (now - _DAY,)
    ).fetchone()[0]
    with_error = conn.execute(
        "SELECT COUNT(*) FROM jobs WHERE state = 'done' AND (error != '' OR contact_id = 0)"
    ).fetchone()[0]
    return QueueStats(
        pending=counts.get("add", 0) + counts.get("send", 0),
        oldest_pending_age_seconds=round(now - oldest, 3) if oldest else None,
        done=counts.get("done", 0),
        failed=counts.get("failed", 0),
        abandoned=counts.get("abandoned", 0),
        retrying=retrying,
        failed_last_day=failed_last_day,
        answered_with_error=with_error,
    )


def _add_missing_columns(conn: sqlite3.Connection) -> None:
    """A journal from an older version gains the columns added since."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(jobs)")}
    if "wants_answer" not in columns:
        conn.execute("ALTER TABLE jobs ADD COLUMN wants_answer INTEGER NOT NULL DEFAULT 1")
    if "found_note" not in columns:  # find-or-create: the note saying which contact was found
        _add_column(conn, "found_note TEXT NOT NULL DEFAULT ''")
    if "batch" not in columns:  # the mark of the group insert that stored the row
        _add_column(conn, "batch INTEGER NOT NULL DEFAULT 0")


class Row(Protocol):
    """A result row by column name: `sqlite3.Row` here, psycopg's dict rows in pg_job_journal."""

    def __getitem__(self, key: str, /) -> Any: ...


def robot_run(row: Row) -> RobotRun:
    """One `jobs` row as the status page lists it; both back ends share the mapping."""
    return RobotRun(
        job_id=row["id"],
        member_id=row["member_id"],
        workflow_id=row["workflow_id"],
        state=row["state"],
        contact_id=row["contact_id"],
        error=row["error"],
        created_at=row["created_at"],
        document_id=row["document_id"],
    )


def job_from_row(row: Row, properties: dict[str, Any]) -> Job:
    """One `jobs` row as the worker needs it; `properties` decoded by the back end (text or jsonb)."""
    return Job(
        id=row["id"],
        event_token=row["event_token"],
        member_id=row["member_id"],
        workflow_id=row["workflow_id"],
        document_id=row["document_id"],
        properties=properties,
        error=row["error"],
        client_endpoint=row["client_endpoint"],
        call_access_token=row["call_access_token"],
        wants_answer=bool(row["wants_answer"]),
        state=row["state"],
        contact_id=row["contact_id"],
        attempts=row["attempts"],
        add_attempted=bool(row["add_attempted"]),
        deadline=row["deadline"],
        created_at=row["created_at"],
        found_note=row["found_note"] or "",
    )


def _job(row: sqlite3.Row) -> Job:
    return job_from_row(row, json.loads(row["properties"]))
