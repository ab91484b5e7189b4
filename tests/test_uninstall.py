"""ONAPPUNINSTALL: authentic events forget the portal; forged ones change nothing."""

import json

import httpx
import pytest

from config import Settings
from tests.conftest import post_form
from tests.fake_portal import FakePortal

pytestmark = pytest.mark.anyio


async def test_uninstall_forgets_the_tokens_and_later_calls_are_refused(
    installed: httpx.AsyncClient, portal: FakePortal, settings: Settings
) -> None:
    response = await post_form(installed, "/uninstall", portal.uninstall_event_body())

    assert response.status_code == 200
    assert json.loads(settings.token_file.read_text())["portals"] == {}
    _, body = portal.robot_call_body({"first_name": "Ivan"})
    assert (await post_form(installed, "/robot", body)).status_code == 401


async def test_forged_uninstall_is_refused_and_keeps_the_tokens(
    installed: httpx.AsyncClient, portal: FakePortal, settings: Settings
) -> None:
    before = settings.token_file.read_bytes()

    response = await post_form(
        installed, "/uninstall", portal.uninstall_event_body(application_token="0" * 32)
    )

    assert response.status_code == 403
    assert settings.token_file.read_bytes() == before


async def test_uninstall_of_an_unknown_portal_is_401(client: httpx.AsyncClient, portal: FakePortal) -> None:
    response = await post_form(client, "/uninstall", portal.uninstall_event_body())

    assert response.status_code == 401
