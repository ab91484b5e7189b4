"""Group commit of robot calls, for both journals: the calls that arrive while one group is being
stored go in the next group, one commit (one fsync) for all of them.

The back end supplies `insert(jobs)`: it stores the jobs not yet known and returns every job's id
by event token, and the tokens this group stored. A token twice in one group is created once; the
second is a delivery again, as a redelivery of a stored token is.
"""

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from repositories.storage_error import StorageError

if TYPE_CHECKING:
    from repositories.job_journal import NewJob

Stored = tuple[dict[str, int], set[str]]  # id by event token; the tokens this group created


class GroupedAdds:
    """`add()` for a journal: concurrent calls share one `insert`, and each learns its outcome."""

    def __init__(self, insert: Callable[[list["NewJob"]], Awaitable[Stored]]) -> None:
        self._insert = insert
        self._waiting: list[tuple[NewJob, asyncio.Future[tuple[int, bool]]]] = []
        self._storing: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop of the group under way

    async def add(self, job: "NewJob") -> tuple[int, bool]:
        """(id, created) once the job is stored: on disk, or committed, when this returns."""
        if self._storing is None or self._storing.done():
            # Looked up once a group, not once a call: on Python 3.11 every get_running_loop()
            # is a getpid() system call (CPython checks for a fork), four of them a robot call.
            self._loop = asyncio.get_running_loop()
            self._storing = self._loop.create_task(self._store_waiting())
        assert self._loop is not None
        done: asyncio.Future[tuple[int, bool]] = self._loop.create_future()
        self._waiting.append((job, done))
        return await done

    async def _store_waiting(self) -> None:
        while self._waiting:
            # One more turn of the event loop before the group is closed: the calls whose bytes
            # arrived meanwhile join it. Idle, it costs nothing; under load it about doubles the
            # group, which halves the statements, commits and thread hand-offs per call.
            await asyncio.sleep(0)
            group, self._waiting = self._waiting, []
            try:
                ids, created = await self._insert([job for job, _ in group])
            except BaseException as exc:  # every waiting call learns of it (503), none is left hanging
                for _, done in group:
                    if not done.done():
                        done.set_exception(exc if isinstance(exc, Exception) else RuntimeError("shut down"))
                if not isinstance(exc, Exception):
                    raise
                continue
            seen: set[str] = set()
            for job, done in group:
                token = job.event_token
                first = token not in seen  # a token twice in one group is created once
                seen.add(token)
                if done.done():  # a caller that went away still has its job stored
                    continue
                if token in ids:
                    done.set_result((ids[token], first and token in created))
                else:  # cannot happen with either journal; if it did, no other call may wait for it
                    done.set_exception(StorageError("The job journal did not confirm this call."))

    async def close(self) -> None:
        """Let the group on its way finish."""
        if self._storing is not None:
            await asyncio.gather(self._storing, return_exceptions=True)
