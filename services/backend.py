"""Where the app's state lives: the embedded files (default) or a shared PostgreSQL (`DATABASE_URL`).

`open_backend` builds the three stores, the worker's leadership and the status of the instances
for the lifespan, behind the repository protocols: the rest of the app does not know which one
it got.
"""

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from psycopg import Error
from psycopg_pool import AsyncConnectionPool

from config import Settings
from repositories.job_journal import JobJournal, SqliteJobJournal
from repositories.oauth_state_store import OAuthStateStore, SqliteOAuthStateStore
from repositories.pg_job_journal import PostgresJobJournal
from repositories.pg_oauth_state_store import PostgresOAuthStateStore
from repositories.pg_token_store import PostgresTokenStore
from repositories.postgres import Heartbeat, migrate, new_instance_id, open_pool
from repositories.token_cipher import TokenCipher
from repositories.token_store import JsonTokenStore, TokenStore
from schemas import ClusterStatus, InstanceSeen
from services.leadership import FileLeadership, Leadership, PostgresLeadership, current_leader

logger = logging.getLogger(__name__)
HEARTBEAT_SECONDS = 5.0


@dataclass
class Backend:
    name: Literal["embedded", "postgresql"]
    instance_id: str
    tokens: TokenStore
    journal: JobJournal
    states: OAuthStateStore
    leadership: Leadership
    pool: AsyncConnectionPool[Any] | None = None
    heartbeat: Heartbeat | None = None

    async def cluster_status(self) -> ClusterStatus:
        """/health's view: the back end, the worker's leader, the instances seen in the last minute."""
        status = ClusterStatus(backend=self.name, instance=self.instance_id)
        if self.pool is None or self.heartbeat is None:
            # Other worker processes on this machine are not known here, only whether this one leads.
            leading = self.leadership.leading
            status.worker_leader = self.instance_id if leading else None
            status.instances = [InstanceSeen(instance=self.instance_id, seen_seconds_ago=0.0, leader=leading)]
            return status
        async with self.pool.connection() as conn:
            status.worker_leader = await current_leader(conn)
        status.instances = [
            seen.model_copy(update={"leader": seen.instance == status.worker_leader})
            for seen in await self.heartbeat.seen()
        ]
        return status


@asynccontextmanager
async def open_backend(settings: Settings) -> AsyncIterator[Backend]:
    key = settings.token_encryption_key
    cipher = TokenCipher(key.get_secret_value() if key else None)
    if settings.database_url is None:
        async with _embedded(settings, cipher) as backend:
            yield backend
    else:
        async with _postgres(settings.database_url.get_secret_value(), cipher) as backend:
            yield backend


@asynccontextmanager
async def _embedded(settings: Settings, cipher: TokenCipher) -> AsyncIterator[Backend]:
    journal = SqliteJobJournal(settings.job_db_file)
    states = SqliteOAuthStateStore(settings.job_db_file)
    leadership = FileLeadership(Path(f"{settings.job_db_file}.worker.lock"))
    tokens = JsonTokenStore(settings.token_file, cipher)
    try:
        yield Backend("embedded", new_instance_id(), tokens, journal, states, leadership)
    finally:
        await journal.close()
        await states.close()


@asynccontextmanager
async def _postgres(url: str, cipher: TokenCipher) -> AsyncIterator[Backend]:
    pool = await open_pool(url)
    try:
        await migrate(pool)
        instance_id = new_instance_id()
        leadership = PostgresLeadership(url, instance_id)
        heartbeat = Heartbeat(pool, instance_id)
        backend = Backend(
            "postgresql",
            instance_id,
            PostgresTokenStore(pool, cipher),
            PostgresJobJournal(pool),
            PostgresOAuthStateStore(pool),
            leadership,
            pool,
            heartbeat,
        )
        beating = asyncio.create_task(_beat(heartbeat, leadership), name="heartbeat")
        try:
            yield backend
        finally:
            beating.cancel()
            with suppress(asyncio.CancelledError):
                await beating
    finally:
        await pool.close()


async def _beat(heartbeat: Heartbeat, leadership: Leadership) -> None:
    while True:
        try:
            await heartbeat.beat(leadership.leading)
        except Error as exc:
            logger.warning("Heartbeat to the database failed: %s", exc)
        await asyncio.sleep(HEARTBEAT_SECONDS)
