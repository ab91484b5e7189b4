"""Writes beside the tokens keep a pair rotated since the record was read, on each back end.

Bitrix24 rotates the refresh token at every refresh and refuses the old one. A handler that reads
a portal's record, awaits something (the PostgreSQL store also serves reads from a one-second
cache), then saves the whole record back, restores a spent refresh token over the rotated pair:
the portal is disconnected at its next refresh. Here another instance rotates the pair right
after the handler's read, which is the race at its narrowest.
"""

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import httpx
import pytest

from repositories.token_store import TokenStore
from schemas import PortalTokens, UpdateEvent
from services.backend import Backend, open_backend
from services.bitrix_client import BitrixClient
from services.processing import ProcessingService
from services.rate_limit import PortalRateLimiter
from tests.test_repository_contract import backend_settings, record

pytestmark = pytest.mark.anyio
ROTATED = {"access": "access-2", "refresh": "refresh-2"}


class RotatedAfterFirstRead:
    """A token store whose first `get` returns, then another instance rotates the pair."""

    def __init__(self, store: TokenStore, rotate: Callable[[], Awaitable[None]]) -> None:
        self._store = store
        self._rotate: Callable[[], Awaitable[None]] | None = rotate

    async def get(self, member_id: str, *, fresh: bool = False) -> PortalTokens | None:
        got = await self._store.get(member_id, fresh=fresh)
        rotate, self._rotate = self._rotate, None
        if rotate is not None:
            await rotate()
        return got

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def rotation_by(other: Backend) -> Callable[[], Awaitable[None]]:
    async def rotate() -> None:
        async with other.tokens.refresh_lock("m1"):
            await other.tokens.save_rotated(record(**ROTATED))

    return rotate


class RobotRegistered:
    async def register_within(self, member_id: str, seconds: float, *, bind_events: bool) -> str:
        return "registered"


def update_event(**tokens: str) -> UpdateEvent:
    auth = {
        "domain": "example.bitrix24.ru",
        "client_endpoint": "https://example.bitrix24.ru/rest/",
        "member_id": "m1",
        "application_token": "app-token-1",
        **tokens,
    }
    return UpdateEvent.model_validate({"event": "ONAPPUPDATE", "auth": auth, "data": {"VERSION": "2"}})


@pytest.mark.parametrize(
    ("tokens", "access"),
    [({}, "access-2"), ({"access_token": "access-event", "expires_in": "3600"}, "access-event")],
    ids=["no tokens", "access token only"],
)
async def test_an_update_event_keeps_a_pair_rotated_after_it_was_read(
    tmp_path: Path, database_url: str | None, tokens: dict[str, str], access: str
) -> None:
    settings = backend_settings(tmp_path, database_url)
    async with open_backend(settings) as first, open_backend(settings) as second:
        await first.tokens.save(record())
        store = RotatedAfterFirstRead(second.tokens, rotation_by(first))
        service = ProcessingService(
            settings,
            cast(TokenStore, store),
            cast(Any, None),
            second.journal,
            second.states,
            lambda: None,
            cast(Any, RobotRegistered()),
        )

        await service.update_from_event(update_event(**tokens))

        stored = await first.tokens.get("m1", fresh=True)
        assert stored is not None
        assert stored.refresh_token == "refresh-2"
        assert stored.access_token == access


async def test_following_a_renamed_portal_keeps_a_pair_rotated_meanwhile(
    tmp_path: Path, database_url: str | None
) -> None:
    # The portal answers from its old address with a redirect; the new address is stored beside
    # the tokens, which another instance rotated while the request was on its way.
    settings = backend_settings(tmp_path, database_url)
    async with open_backend(settings) as first, open_backend(settings) as second:
        await first.tokens.save(record())
        rotate = rotation_by(first)

        async def portal(request: httpx.Request) -> httpx.Response:
            if request.url.host == "example.bitrix24.ru":
                await rotate()
                return httpx.Response(302, headers={"location": "https://renamed.bitrix24.ru/rest/profile"})
            return httpx.Response(200, json={"result": {"ID": "1"}})

        async with httpx.AsyncClient(transport=httpx.MockTransport(portal)) as http:
            client = BitrixClient(http, second.tokens, settings, PortalRateLimiter(50, 2.0))
            await client.call("m1", "profile")

        stored = await first.tokens.get("m1", fresh=True)
        assert stored is not None
        assert stored.domain == "renamed.bitrix24.ru"
        assert stored.refresh_token == "refresh-2"
