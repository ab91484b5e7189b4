"""Pending OAuth `state` values: random, bound to the browser that asked, single use, expiring.

Kept in SQLite (the job journal's file) rather than in memory, so the callback may land on any
worker process and a used state can never be replayed.
"""

import asyncio
import hashlib
import hmac
import sqlite3
import threading
import time
from pathlib import Path
from typing import Protocol

from repositories.job_journal import create_private


class OAuthStateStore(Protocol):
    async def put(self, state: str, browser_nonce: str, portal_url: str, ttl: float) -> None: ...

    async def take(self, state: str, browser_nonce: str) -> str | None:
        """Consume `state`; the portal URL it was issued for, or None if invalid for this browser."""
        ...


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


class SqliteOAuthStateStore:
    def __init__(self, path: Path) -> None:
        create_private(path)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS oauth_states (state_hash TEXT PRIMARY KEY,"
                " nonce_hash TEXT NOT NULL, portal_url TEXT NOT NULL, expires_at REAL NOT NULL)"
            )

    async def put(self, state: str, browser_nonce: str, portal_url: str, ttl: float) -> None:
        await asyncio.to_thread(
            self._put, _digest(state), _digest(browser_nonce), portal_url, time.time() + ttl
        )

    def _put(self, state_hash: str, nonce_hash: str, portal_url: str, expires_at: float) -> None:
        with self._lock:
            self._db.execute("DELETE FROM oauth_states WHERE expires_at < ?", (time.time(),))
            self._db.execute(
                "INSERT INTO oauth_states VALUES (?, ?, ?, ?)",
                (state_hash, nonce_hash, portal_url, expires_at),
            )

    async def take(self, state: str, browser_nonce: str) -> str | None:
        return await asyncio.to_thread(self._take, _digest(state), _digest(browser_nonce))

    def _take(self, state_hash: str, nonce_hash: str) -> str | None:
        with self._lock:
            # Deleting first makes the state single-use even when the browser check fails.
            row = self._db.execute(
                "DELETE FROM oauth_states WHERE state_hash = ? RETURNING nonce_hash, portal_url, expires_at",
                (state_hash,),
            ).fetchone()
        if row is None or row[2] < time.time() or not hmac.compare_digest(row[0], nonce_hash):
            return None
        return str(row[1])

    async def close(self) -> None:
        with self._lock:
            self._db.close()
