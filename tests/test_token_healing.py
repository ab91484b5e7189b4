"""Tokens that heal themselves: a dead refresh token is replaced by the next authentic robot call's
pair (never by a forged one), and refresh tokens are renewed before their 180 days run out."""

import asyncio
import json
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import httpx
import pytest

from config import Settings
from repositories.token_store import CHECK_SECONDS
from tests.conftest import APP_URL, answer_for, eventually, make_settings, post_form
from tests.fake_portal import FakePortal, FakePortalConfig

pytestmark = pytest.mark.anyio

GOOD = {"last_name": "Ivanov", "first_name": "Ivan", "email": "ivan@example.com"}
REFRESH_TTL = 3.0  # the fake authorization server's 180 days, shortened


@pytest.fixture
def portal_config() -> FakePortalConfig:
    return FakePortalConfig(redirect_uri=f"{APP_URL}/app", refresh_ttl=REFRESH_TTL)


def _stored(settings: Settings, portal: FakePortal) -> dict[str, Any]:
    record: dict[str, Any] = json.loads(settings.token_file.read_text())["portals"][portal.config.member_id]
    return record


def _call_pair(body: str) -> tuple[str, str]:
    fields = dict(parse_qsl(body))
    return fields["auth[access_token]"], fields["auth[refresh_token]"]


async def _portal_status(client: httpx.AsyncClient) -> dict[str, Any]:
    health: dict[str, Any] = (await client.get("/health")).json()
    return health


async def _disconnect(installed: httpx.AsyncClient, portal: FakePortal, settings: Settings) -> dict[str, Any]:
    """Let the stored refresh token die, then send a robot call: its refresh is refused for good."""
    dead = _stored(settings, portal)["refresh_token"]
    await eventually(lambda: not portal.refresh_token_alive(dead), what="the refresh token to expire")
    portal.expire_access_tokens()
    token, body = portal.robot_call_body(GOOD)
    await post_form(installed, "/robot", body)
    return await answer_for(portal, token)


async def test_dead_refresh_token_is_healed_by_the_next_authentic_robot_call_only(
    installed: httpx.AsyncClient, portal: FakePortal, settings: Settings
) -> None:
    # The first call finds the stored pair dead: the refresh is refused for good.
    answer = await _disconnect(installed, portal, settings)
    assert int(answer["return_values"]["contact_id"]) == 0
    health = await _portal_status(installed)
    assert health["portal_connected"] is False
    assert "invalid_grant" in _stored(settings, portal)["disconnected_reason"]

    # A forged call carries a fresh pair too, but replaces nothing.
    before = settings.token_file.read_bytes()
    _, forged = portal.robot_call_body(GOOD, application_token="0" * 32)
    assert (await post_form(installed, "/robot", forged)).status_code == 403
    assert settings.token_file.read_bytes() == before

    # The next authentic call brings the portal back, without an administrator.
    token, body = portal.robot_call_body({**GOOD, "first_name": "Petr"})
    assert (await post_form(installed, "/robot", body)).status_code == 200
    answer = await answer_for(portal, token)
    assert answer["return_values"]["error"] == ""
    assert int(answer["return_values"]["contact_id"]) > 0
    access, refresh = _call_pair(body)
    stored = _stored(settings, portal)
    assert (stored["access_token"], stored["refresh_token"]) == (access, refresh)
    assert stored["disconnected_reason"] is None
    assert (await _portal_status(installed))["portal_connected"] is True


async def test_a_working_stored_pair_is_not_replaced_by_a_robot_call(
    installed: httpx.AsyncClient, portal: FakePortal, settings: Settings
) -> None:
    before = _stored(settings, portal)
    token, body = portal.robot_call_body(GOOD)

    await post_form(installed, "/robot", body)
    await answer_for(portal, token)

    assert _stored(settings, portal)["refresh_token"] == before["refresh_token"]


@pytest.fixture
def renewing_settings(tmp_path: Path, portal: FakePortal) -> Settings:
    # Renew a refresh token once it is 0.3 s old; it dies after REFRESH_TTL.
    return make_settings(tmp_path, portal, token_renew_after_seconds=0.3)


async def test_refresh_tokens_are_renewed_before_they_expire(
    portal: FakePortal, renewing_settings: Settings, tmp_path: Path
) -> None:
    from asgi_lifespan import LifespanManager

    from config import get_settings
    from main import create_app

    app = create_app()
    app.dependency_overrides[get_settings] = lambda: renewing_settings
    async with (
        LifespanManager(app) as manager,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=manager.app), base_url=APP_URL) as client,
    ):
        assert (await post_form(client, "/install", portal.install_event_body())).status_code == 200
        first = _stored(renewing_settings, portal)["refresh_token"]
        later = time.time() + 2 * REFRESH_TTL

        # Twice the refresh token's lifetime without a single robot call...
        await eventually(lambda: time.time() > later, timeout=30, what="two refresh token lifetimes")
        assert not portal.refresh_token_alive(first)
        assert portal.stats["refreshes"] >= 2

        # ...and the stored pair still works: no refresh was ever refused.
        def stored_alive() -> bool:
            return portal.refresh_token_alive(_stored(renewing_settings, portal)["refresh_token"])

        await eventually(stored_alive, what="a live stored token")
        assert not any("invalid_grant" in error for error in portal.recent_errors)
        portal.expire_access_tokens()
        token, body = portal.robot_call_body(GOOD)
        await post_form(client, "/robot", body)
        assert (await answer_for(portal, token))["return_values"]["error"] == ""
        assert (await _portal_status(client))["portal_connected"] is True


async def test_a_pair_past_180_days_is_known_dead_and_the_first_robot_call_heals_it(
    installed: httpx.AsyncClient, portal: FakePortal, settings: Settings
) -> None:
    # The app was stopped for half a year: by the documented lifetime its refresh token is dead.
    data = json.loads(settings.token_file.read_text())
    data["portals"][portal.config.member_id]["refresh_issued_at"] = time.time() - 181 * 86400
    settings.token_file.write_text(json.dumps(data))
    # Written behind the app's back, as by another process: seen within CHECK_SECONDS.
    await asyncio.sleep(CHECK_SECONDS)
    assert (await _portal_status(installed))["portal_connected"] is False

    token, body = portal.robot_call_body(GOOD)
    await post_form(installed, "/robot", body)

    assert (await answer_for(portal, token))["return_values"]["error"] == ""
    assert _stored(settings, portal)["refresh_token"] == _call_pair(body)[1]
    assert (await _portal_status(installed))["portal_connected"] is True


async def test_a_pair_another_process_just_healed_is_not_replaced(
    installed: httpx.AsyncClient, portal: FakePortal, settings: Settings
) -> None:
    # This process still holds the record that says "disconnected" (read within CHECK_SECONDS)
    # when another process heals the portal with the pair of its own robot call.
    await _disconnect(installed, portal, settings)
    assert (await _portal_status(installed))["portal_connected"] is False

    _, other = portal.robot_call_body(GOOD)
    access, refresh = _call_pair(other)
    data = json.loads(settings.token_file.read_text())
    record = data["portals"][portal.config.member_id]
    record.update(
        access_token=access, refresh_token=refresh, disconnected_reason=None, updated_at=time.time()
    )
    settings.token_file.write_text(json.dumps(data))  # the other process's heal

    token, body = portal.robot_call_body({**GOOD, "first_name": "Petr"})
    assert (await post_form(installed, "/robot", body)).status_code == 200
    stored = _stored(settings, portal)
    assert (stored["access_token"], stored["refresh_token"]) == (access, refresh)
    assert (await answer_for(portal, token))["return_values"]["error"] == ""
