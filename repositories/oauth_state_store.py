"""Pending OAuth `state` values: random, bound to the browser that asked, single use, expiring.

Kept in SQLite (the job journal's file, through the one shared `SqliteDatabase`) rather than in
memory, so the callback may land on any worker process and a used state can never be replayed.
"""

import hashlib
import hmac
import sqlite3
import time
from typing import Protocol

from repositories.sqlite_db import SqliteDatabase, transaction


class OAuthStateStore(Protocol):
    async def put(self, state: str, browser_nonce: str, portal_url: str, ttl: float) -> None: ...

    async def take(self, state: str, browser_nonce: str) -> str | None:
        """Consume `state`; the portal URL it was issued for, or None if invalid for this browser."""
        ...


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


class SqliteOAuthStateStore:
    def __init__(self, db: SqliteDatabase) -> None:
        self._db = db
        db.run_now(
            lambda conn: conn.execute(
                "CREATE TABLE IF NOT EXISTS oauth_states (state_hash TEXT PRIMARY KEY,"
                " nonce_hash TEXT NOT NULL, portal_url TEXT NOT NULL, expires_at REAL NOT NULL)"
            )
        )

    async def put(self, state: str, browser_nonce: str, portal_url: str, ttl: float) -> None:
        row = (_digest(state), _digest(browser_nonce), portal_url, time.time() + ttl)

        def put(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM oauth_states WHERE expires_at < ?", (time.time(),))
            conn.execute("INSERT INTO oauth_states VALUES (?, ?, ?, ?)", row)

        await self._db.run(lambda conn: transaction(conn, put))

    async def take(self, state: str, browser_nonce: str) -> str | None:
        # Deleting first makes the state single-use even when the browser check fails.
        # fetchall: a half-read RETURNING statement would keep its transaction open.
        rows = await self._db.run(
            lambda conn: conn.execute(
                "DELETE FROM oauth_states WHERE state_hash = ? RETURNING nonce_hash, portal_url, expires_at",
                (_digest(state),),
            ).fetchall()
        )
        if not rows or rows[0][2] < time.time():
            return None
        if not hmac.compare_digest(rows[0][0], _digest(browser_nonce)):
            return None
        return str(rows[0][1])
