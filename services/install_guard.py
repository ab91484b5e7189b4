"""Unauthenticated installs get their own small budget, apart from the robot's REST traffic.

An install is not authenticated until its tokens are proven, and proving them costs a request to
the portal, which the portal counts against the app's rate limit whether the token is good or
not. So a proof never waits for the rate limit (services/rate_limit.py) that paces robot work: it
takes only room the bucket has to spare (BitrixClient.probe_with_token), waiting a few seconds
at most for it. Each portal also has one proof in flight at a time, and all portals together
`MAX_PROOFS`. An install that cannot start its
proof within `WAIT_SECONDS`, or finds no room to spare within the proof's time limit, is refused
(429) rather than queued: a flood of forged installs costs little and delays nothing.
"""

import asyncio
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from services.errors import TooManyInstalls

MAX_PROOFS = 4
WAIT_SECONDS = 1.0
PROOF_TIMEOUT_SECONDS = 5.0  # one app.info; a portal slower than this is treated as unreachable
_MAX_PORTALS = 1024  # locks kept for this many portal hosts (a flood may name many)


class ProofGate:
    """One proof per portal at a time, `MAX_PROOFS` in all; a caller waits `WAIT_SECONDS` at most."""

    def __init__(self, max_proofs: int = MAX_PROOFS, wait_seconds: float = WAIT_SECONDS) -> None:
        self._all = asyncio.Semaphore(max_proofs)
        self._wait = wait_seconds
        self._portals: OrderedDict[str, asyncio.Lock] = OrderedDict()

    @asynccontextmanager
    async def slot(self, portal: str) -> AsyncIterator[None]:
        """Hold the portal's proof slot, or raise TooManyInstalls."""
        lock = self._lock(portal)
        try:
            async with asyncio.timeout(self._wait):
                await lock.acquire()
                try:
                    await self._all.acquire()
                except BaseException:
                    lock.release()
                    raise
        except TimeoutError:
            raise TooManyInstalls(
                f"Another install of {portal} is being verified; the portal may retry in a moment."
            ) from None
        try:
            yield
        finally:
            self._all.release()
            lock.release()

    def _lock(self, portal: str) -> asyncio.Lock:
        lock = self._portals.get(portal)
        if lock is None:
            lock = self._portals[portal] = asyncio.Lock()
            # Forget idle portals beyond the bound; a lock in use stays.
            for name in [n for n, held in self._portals.items() if not held.locked()]:
                if len(self._portals) <= _MAX_PORTALS:
                    break
                del self._portals[name]
        self._portals.move_to_end(portal)
        return lock
