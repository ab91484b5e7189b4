"""Client-side leaky bucket per portal, matching the portal's own (burst X, drain Y per second).

Staying under the portal's bucket avoids `QUERY_LIMIT_EXCEEDED` instead of recovering from it.
aiolimiter implements exactly this bucket: capacity `burst`, refilled at `burst / period`.
"""

import asyncio
import time

from aiolimiter import AsyncLimiter

_SPARE_POLL_SECONDS = 0.05


class PortalRateLimiter:
    """One bucket per portal host, created on first use."""

    def __init__(self, burst: int, per_second: float) -> None:
        self._burst = burst
        self._period = burst / per_second
        self._buckets: dict[str, AsyncLimiter] = {}

    async def acquire(self, portal: str) -> None:
        """Wait until the portal's bucket has room for one more request."""
        await self._bucket(portal).acquire()

    async def try_spare(self, portal: str, wait: float = 0.0) -> bool:
        """Take one request of the bucket's spare room: only while a fifth of the bucket stays free
        for the app's own work (a batch request carries 50 robot calls, so that is room for
        hundreds). Waits up to `wait` seconds for the bucket to drain that far, so a genuine install
        that arrives during a burst of robot work goes through once the burst eases, while a flood
        still only ever takes spare room. False when there is none within `wait`."""
        bucket = self._bucket(portal)
        deadline = time.monotonic() + wait
        while not bucket.has_capacity(1 + self._burst // 5):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(_SPARE_POLL_SECONDS)
        await bucket.acquire()  # does not wait: has_capacity() just said so, and nothing ran since
        return True

    def _bucket(self, portal: str) -> AsyncLimiter:
        bucket = self._buckets.get(portal)
        if bucket is None:
            bucket = self._buckets[portal] = AsyncLimiter(self._burst, self._period)
        return bucket
