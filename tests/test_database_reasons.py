"""What /health says when PostgreSQL fails: a bounded sentence; the driver's own text only in the log.

/health answers anyone who can reach the app (interface.md, "/health for monitors"). The driver's
text can name the database server's host and port, the role and the database (libpq's
`connection to server at "..."`, `password authentication failed for user "..."`), a server file,
and it runs to several lines: it belongs in the log, where secrets are masked.
"""

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast

import psycopg
import pytest

from repositories.pg_job_journal import PostgresJobJournal
from repositories.pg_token_store import PostgresTokenStore
from repositories.token_store import TokenStoreError
from services.observability import RedactingFormatter, register_secret

pytestmark = pytest.mark.anyio
PASSWORD = "s3cret-db-password"
DRIVER_TEXT = (
    'connection failed: connection to server at "db.internal.example" (10.20.30.40), port 5433 failed: '
    'FATAL:  password authentication failed for user "robot_app"\n'
    f"DETAIL:  postgresql://robot_app:{PASSWORD}@db.internal.example:5433/robot"
)
PRIVATE = ("db.internal.example", "10.20.30.40", "5433", "robot_app", PASSWORD, "\n")


class FailingPool:
    """A pool whose every connection fails as libpq reports it."""

    @asynccontextmanager
    async def connection(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        raise psycopg.OperationalError(DRIVER_TEXT)
        yield  # pragma: no cover

    async def check(self) -> None:
        pass


def _logged(caplog: pytest.LogCaptureFixture) -> str:
    register_secret(PASSWORD)  # as main.py does for DATABASE_URL and its password
    formatter = RedactingFormatter("%(message)s")
    return "\n".join(formatter.format(record) for record in caplog.records)


def _assert_bounded_and_logged(reason: str, caplog: pytest.LogCaptureFixture) -> None:
    """Short, nothing private in the reason; the driver's own words in the log, still no password."""
    assert len(reason) <= 200
    assert not [part for part in PRIVATE if part in reason]
    logged = _logged(caplog)
    assert "password authentication failed" in logged
    assert PASSWORD not in logged


async def test_the_journal_reason_is_bounded_and_the_detail_logged(caplog: pytest.LogCaptureFixture) -> None:
    journal = PostgresJobJournal(cast(Any, FailingPool()))

    with caplog.at_level(logging.WARNING):
        reason = await journal.check()

    assert reason is not None
    assert reason.startswith("The PostgreSQL job journal cannot be used: ")
    _assert_bounded_and_logged(reason, caplog)


async def test_the_token_store_error_is_bounded_and_the_detail_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tokens = PostgresTokenStore(cast(Any, FailingPool()))

    with caplog.at_level(logging.WARNING), pytest.raises(TokenStoreError) as raised:
        await tokens.list()

    reason = str(raised.value)
    # Names the setting to check, as the journal's 503 does, whichever of the two fails first.
    assert reason.startswith("The token store (PostgreSQL, DATABASE_URL) failed to read: ")
    _assert_bounded_and_logged(reason, caplog)
