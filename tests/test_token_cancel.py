"""A refresh cancelled after its request was sent (shutdown, a deadline) still stores the new pair.

The authorization server rotates the refresh token as soon as it reads the request. If the task
that sent it is cancelled before the reply is saved (uvicorn's shutdown cancels the token upkeep;
an install's deadline cancels the robot registration), the only live refresh token is lost and the
next refresh, in this or another worker process, is refused with invalid_grant: the portal is
disconnected.
"""

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from repositories.token_store import JsonTokenStore
from services.bitrix_client import BitrixClient
from services.rate_limit import PortalRateLimiter
from tests.conftest import make_settings, write_installed_portal
from tests.fake_portal import FakePortal

pytestmark = pytest.mark.anyio


class _SlowTokenReplies(httpx.AsyncBaseTransport):
    """Forwards to the portal; a token reply, once the server has rotated the pair, waits for `release`."""

    def __init__(self) -> None:
        self._inner = httpx.AsyncHTTPTransport()
        self.rotated = asyncio.Event()
        self.release = asyncio.Event()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self._inner.handle_async_request(request)
        if "/oauth/token" in request.url.path:
            await response.aread()
            self.rotated.set()
            await self.release.wait()
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()


async def test_a_renewal_cancelled_after_the_server_rotated_still_saves_the_new_pair(
    tmp_path: Path, portal: FakePortal
) -> None:
    settings = make_settings(tmp_path, portal)
    access = write_installed_portal(portal, settings.token_file).access_token or ""
    transport = _SlowTokenReplies()
    async with httpx.AsyncClient(transport=transport) as http:
        store = JsonTokenStore(settings.token_file)
        client = BitrixClient(http, store, settings, PortalRateLimiter(50, 50))
        renewal = asyncio.create_task(client.renew(portal.config.member_id, access))
        await asyncio.wait_for(transport.rotated.wait(), 10)
        renewal.cancel()  # as the lifespan cancels the token upkeep at shutdown
        await asyncio.sleep(0.05)
        transport.release.set()
        with pytest.raises(asyncio.CancelledError):
            await renewal

    assert portal.stats["refreshes"] == 1
    stored = json.loads(settings.token_file.read_text())["portals"][portal.config.member_id]
    assert portal.refresh_token_alive(stored["refresh_token"])
