"""The install proofs' share of a portal's bucket: spare room only, waited for a few seconds at most."""

import pytest

from services.rate_limit import PortalRateLimiter

pytestmark = pytest.mark.anyio


async def _fill(limiter: PortalRateLimiter, portal: str, requests: int) -> None:
    for _ in range(requests):
        await limiter.acquire(portal)


async def test_a_proof_takes_spare_room_at_once() -> None:
    limiter = PortalRateLimiter(burst=10, per_second=2.0)
    assert await limiter.try_spare("a.bitrix24.ru")


async def test_a_busy_bucket_gives_no_spare_room_without_waiting() -> None:
    limiter = PortalRateLimiter(burst=10, per_second=2.0)
    await _fill(limiter, "a.bitrix24.ru", 10)
    assert not await limiter.try_spare("a.bitrix24.ru")


async def test_a_proof_waits_for_a_busy_bucket_to_ease_instead_of_failing() -> None:
    # A genuine install during a burst of robot work: the bucket drains (10 per second here) and
    # the proof goes through, where refusing at once would lose an install the portal never resends.
    limiter = PortalRateLimiter(burst=10, per_second=10.0)
    await _fill(limiter, "a.bitrix24.ru", 10)
    assert await limiter.try_spare("a.bitrix24.ru", wait=5.0)


async def test_another_portals_bucket_is_not_touched() -> None:
    limiter = PortalRateLimiter(burst=10, per_second=2.0)
    await _fill(limiter, "a.bitrix24.ru", 10)
    assert await limiter.try_spare("b.bitrix24.ru")
