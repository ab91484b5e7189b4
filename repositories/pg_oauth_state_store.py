"""`OAuthStateStore` in PostgreSQL: the OAuth callback may land on any instance on any host."""

import hmac
import time
from typing import Any

from psycopg_pool import AsyncConnectionPool

from repositories.oauth_state_store import _digest


class PostgresOAuthStateStore:
    def __init__(self, pool: AsyncConnectionPool[Any]) -> None:
        self._pool = pool

    async def put(self, state: str, browser_nonce: str, portal_url: str, ttl: float) -> None:
        now = time.time()
        async with self._pool.connection() as conn:
            await conn.execute("DELETE FROM oauth_states WHERE expires_at < %s", (now,))
            await conn.execute(
                "INSERT INTO oauth_states VALUES (%s, %s, %s, %s)",
                (_digest(state), _digest(browser_nonce), portal_url, now + ttl),
            )

    async def take(self, state: str, browser_nonce: str) -> str | None:
        async with self._pool.connection() as conn:
            # Deleting first makes the state single-use even when the browser check fails.
            cursor = await conn.execute(
                "DELETE FROM oauth_states WHERE state_hash = %s RETURNING nonce_hash, portal_url, expires_at",
                (_digest(state),),
            )
            row = await cursor.fetchone()
        if row is None or row[2] < time.time() or not hmac.compare_digest(row[0], _digest(browser_nonce)):
            return None
        return str(row[1])

    async def close(self) -> None:
        """The pool belongs to the back end, which closes it."""
