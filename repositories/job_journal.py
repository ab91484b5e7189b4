"""The durable job journal: every robot call the app has acknowledged, until its workflow is answered.

A job moves `add` (create the contact) → `send` (answer the workflow) → `done`; or ends `abandoned`
(the workflow is gone) or `failed` (the retry budget ran out). `SqliteJobJournal` is the embedded
default: the standard library's sqlite3 in WAL mode, so a `kill -9` loses no committed job, and
several worker processes can share the file. Workers claim jobs with a lease; a job whose lease
expired (its worker died) is claimed again.
"""

import asyncio
import json
import os
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from schemas import QueueStats, RobotRun

JobState = Literal["add", "send", "done", "failed", "abandoned"]
TERMINAL: tuple[JobState, ...] = ("done", "failed", "abandoned")


@dataclass(frozen=True)
class NewJob:
    """An accepted robot call, as the worker needs it later."""

    event_token: str
    member_id: str
    workflow_id: str
    document_id: str
    deadline: float
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
    async def add(self, job: NewJob) -> tuple[int, bool]:
        """Store a job; returns (id, created). A known `event_token` is not stored twice."""
        ...

    async def claim(self, limit: int, lease_seconds: float) -> list[Job]: ...

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
    found_note TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS jobs_due ON jobs (state, next_attempt_at);
"""


class SqliteJobJournal:
    """`JobJournal` on an embedded SQLite file."""

    def __init__(self, path: Path) -> None:
        self._path = path
        create_private(path)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a committed job survives the process dying (kill -9); only a
            # power cut may take the last commits, a trade the acknowledgement rate needs.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            _add_missing_columns(self._db)
        # A second connection that never waits for SQLite's write lock, for the inline insert.
        self._fast = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=0)
        self._fast.execute("PRAGMA synchronous=NORMAL")

    async def add(self, job: NewJob) -> tuple[int, bool]:
        # Every robot call waits for this insert before its 200. In WAL mode with synchronous=NORMAL
        # it takes microseconds, less than a hop to a thread, so it runs right here; only when the
        # write lock is taken (a thread of ours, another worker process) does it wait in a thread.
        if self._lock.acquire(blocking=False):
            try:
                return self._insert(self._fast, job)
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
            finally:
                self._lock.release()
        return await asyncio.to_thread(self._add, job)

    def _add(self, job: NewJob) -> tuple[int, bool]:
        with self._lock:
            return self._insert(self._db, job)

    @staticmethod
    def _insert(db: sqlite3.Connection, job: NewJob) -> tuple[int, bool]:
        now = time.time()
        row = (
            job.event_token,
            job.member_id,
            job.workflow_id,
            job.document_id,
            json.dumps(job.properties, ensure_ascii=False),
            job.error,
            job.client_endpoint,
            job.call_access_token,
            int(job.wants_answer),
            "add",
            job.deadline,
            now,
            now,
            now,
        )
        cursor = db.execute(
            "INSERT INTO jobs (event_token, member_id, workflow_id, document_id, properties, error,"
            " client_endpoint, call_access_token, wants_answer, state, deadline, next_attempt_at,"
            " created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
            " ON CONFLICT(event_token) DO NOTHING",
            row,
        )
        if cursor.rowcount:
            return int(cursor.lastrowid or 0), True
        found = db.execute("SELECT id FROM jobs WHERE event_token = ?", (job.event_token,)).fetchone()
        return int(found[0]), False

    async def claim(self, limit: int, lease_seconds: float) -> list[Job]:
        return await asyncio.to_thread(self._claim, limit, lease_seconds)

    def _claim(self, limit: int, lease_seconds: float) -> list[Job]:
        now = time.time()
        with self._lock:
            rows = self._db.execute(
                "UPDATE jobs SET lease_until = ? WHERE id IN (SELECT id FROM jobs WHERE state IN"
                " ('add', 'send') AND next_attempt_at <= ? AND lease_until <= ? ORDER BY id LIMIT ?)"
                " RETURNING *",
                (now + lease_seconds, now, now, limit),
            ).fetchall()
        return sorted((_job(row) for row in rows), key=lambda job: job.id)

    async def reclaim_leases(self) -> int:
        return await asyncio.to_thread(self._reclaim_leases)

    def _reclaim_leases(self) -> int:
        with self._lock:
            cursor = self._db.execute(
                "UPDATE jobs SET lease_until = 0 WHERE state IN ('add', 'send') AND lease_until > ?",
                (time.time(),),
            )
            return cursor.rowcount

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

    async def stats(self) -> QueueStats:
        return await asyncio.to_thread(self._stats)

    def _stats(self) -> QueueStats:
        with self._lock:
            counts = dict(self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
            oldest = self._db.execute(
                "SELECT MIN(created_at) FROM jobs WHERE state IN ('add', 'send')"
            ).fetchone()[0]
            with_error = self._db.execute(
                "SELECT COUNT(*) FROM jobs WHERE state = 'done' AND (error != '' OR contact_id = 0)"
            ).fetchone()[0]
        return QueueStats(
            pending=counts.get("add", 0) + counts.get("send", 0),
            oldest_pending_age_seconds=round(time.time() - oldest, 3) if oldest else None,
            done=counts.get("done", 0),
            failed=counts.get("failed", 0),
            abandoned=counts.get("abandoned", 0),
            answered_with_error=with_error,
        )

    async def recent(self, limit: int) -> list[RobotRun]:
        rows = await asyncio.to_thread(
            self._fetchall, "SELECT * FROM jobs ORDER BY id DESC LIMIT ?", (limit,)
        )
        return [
            RobotRun(
                job_id=row["id"],
                member_id=row["member_id"],
                workflow_id=row["workflow_id"],
                state=row["state"],
                contact_id=row["contact_id"],
                error=row["error"],
                created_at=row["created_at"],
                document_id=row["document_id"],
            )
            for row in rows
        ]

    async def close(self) -> None:
        with self._lock:
            self._fast.close()
            self._db.close()

    async def _execute_many(self, sql: str, ids: Sequence[int]) -> None:
        now = time.time()
        await self._write_many(sql, [(now, job_id) for job_id in ids])

    async def _write_many(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        await asyncio.to_thread(self._run_many, sql, rows)

    def _run_many(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany(sql, rows)
            self._db.execute("COMMIT")

    def _fetchall(self, sql: str, params: tuple[Any, ...]) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    async def _fetchone(self, sql: str, params: tuple[Any, ...]) -> sqlite3.Row | None:
        rows = await asyncio.to_thread(self._fetchall, sql, params)
        return rows[0] if rows else None


def _add_column(db: sqlite3.Connection, definition: str) -> None:
    try:
        db.execute(f"ALTER TABLE jobs ADD COLUMN {definition}")
    except sqlite3.OperationalError as exc:
        if "duplicate column" not in str(exc):  # another process added it a moment ago
            raise


def create_private(path: Path) -> None:
    """Create the database file readable by its owner only: it holds event and access tokens.

    SQLite gives its -wal and -shm files the same permissions.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))


def _add_missing_columns(db: sqlite3.Connection) -> None:
    """A journal from an older version gains the columns added since."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
    if "wants_answer" not in columns:
        db.execute("ALTER TABLE jobs ADD COLUMN wants_answer INTEGER NOT NULL DEFAULT 1")
    if "found_note" not in columns:  # find-or-create: the note saying which contact was found
        _add_column(db, "found_note TEXT NOT NULL DEFAULT ''")


def _job(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"],
        event_token=row["event_token"],
        member_id=row["member_id"],
        workflow_id=row["workflow_id"],
        document_id=row["document_id"],
        properties=json.loads(row["properties"]),
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
        found_note=row["found_note"],
    )
