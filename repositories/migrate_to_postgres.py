"""Copy an embedded installation (tokens.json and the unfinished jobs of jobs.sqlite3) into PostgreSQL.

    DATABASE_URL=postgresql://user:password@host:5432/db python -m repositories.migrate_to_postgres

Run it in the old working directory (it reads TOKEN_FILE, JOB_DB_FILE and TOKEN_ENCRYPTION_KEY from
.env and the environment like the app), with the embedded app stopped, then start the instances
with DATABASE_URL. Nothing is deleted or changed in the files. Running it twice is harmless: a job
already in the database (same event_token) is kept as it is, and a portal's tokens are only
replaced by the file's when the file's are newer.
"""

import argparse
import asyncio
import json
import sqlite3
import sys
from pathlib import Path
from typing import Any

from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from config import Settings
from repositories.postgres import migrate, open_pool
from repositories.token_cipher import TokenCipher
from repositories.token_store import JsonTokenStore, TokenStoreError

_JOB_COLUMNS = (
    "event_token, member_id, workflow_id, document_id, properties, error, client_endpoint,"
    " call_access_token, state, contact_id, attempts, add_attempted, deadline, next_attempt_at,"
    " created_at, updated_at, wants_answer, found_note"
)
# Columns later versions added to the embedded journal, with the value an older journal implies.
_LATER_COLUMNS = {"wants_answer": "1", "found_note": "''"}


async def copy_tokens(
    pool: AsyncConnectionPool[Any], token_file: Path, cipher: TokenCipher
) -> tuple[int, int]:
    """(portals copied, portals whose database copy was as new or newer)."""
    records = await JsonTokenStore(token_file, cipher).list()
    copied = 0
    async with pool.connection() as conn:
        for record in records:
            cursor = await conn.execute(
                "INSERT INTO portal_tokens (member_id, record, updated_at) VALUES (%s, %s, %s)"
                " ON CONFLICT (member_id) DO UPDATE SET record = EXCLUDED.record,"
                " updated_at = EXCLUDED.updated_at WHERE portal_tokens.updated_at < EXCLUDED.updated_at",
                (record.member_id, Jsonb(cipher.seal(record.model_dump(mode="json"))), record.updated_at),
            )
            copied += cursor.rowcount
    return copied, len(records) - copied


def unfinished_jobs(job_db: Path) -> list[tuple[Any, ...]]:
    if not job_db.exists():
        return []
    db = sqlite3.connect(f"file:{job_db}?mode=ro", uri=True)
    try:
        present = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
        columns = ", ".join(
            name if name in present or name not in _LATER_COLUMNS else f"{_LATER_COLUMNS[name]} AS {name}"
            for name in _JOB_COLUMNS.replace(" ", "").split(",")
        )
        sql = f"SELECT {columns} FROM jobs WHERE state IN ('add', 'send') ORDER BY id"  # noqa: S608
        return db.execute(sql).fetchall()
    finally:
        db.close()


async def copy_jobs(pool: AsyncConnectionPool[Any], job_db: Path) -> tuple[int, int]:
    """(jobs copied, jobs already in the database)."""
    rows = unfinished_jobs(job_db)
    copied = 0
    async with pool.connection() as conn, conn.transaction():
        for row in rows:
            values = list(row)
            values[4] = Jsonb(json.loads(values[4]))
            values[11] = bool(values[11])
            values[16] = bool(values[16])
            cursor = await conn.execute(
                f"INSERT INTO jobs ({_JOB_COLUMNS}) VALUES ({', '.join(['%s'] * len(values))})"  # noqa: S608
                " ON CONFLICT (event_token) DO NOTHING",
                values,
            )
            copied += cursor.rowcount
    return copied, len(rows) - copied


async def run(settings: Settings) -> str:
    if settings.database_url is None:
        raise SystemExit(
            "Set DATABASE_URL=postgresql://user:password@host:port/db (in .env or the environment)"
        )
    key = settings.token_encryption_key
    cipher = TokenCipher(key.get_secret_value() if key else None)
    pool = await open_pool(settings.database_url.get_secret_value(), max_size=2)
    try:
        await migrate(pool)
        portals, kept = await copy_tokens(pool, settings.token_file, cipher)
        jobs, known = await copy_jobs(pool, settings.job_db_file)
    finally:
        await pool.close()
    return (
        f"Copied {portals} portal(s) from {settings.token_file} ({kept} already up to date) and"
        f" {jobs} unfinished job(s) from {settings.job_db_file} ({known} already there)."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.parse_args(argv)
    try:
        print(asyncio.run(run(Settings())))
    except TokenStoreError as exc:
        print(f"Nothing copied: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
