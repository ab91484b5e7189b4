"""The OAuth authorization-code grant through the fake portal's real HTTP endpoints."""

import json
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from config import Settings
from router import NONCE_COOKIE
from tests.conftest import APP_URL
from tests.fake_portal import FakePortal

pytestmark = pytest.mark.anyio


async def get_with_nonce(client: httpx.AsyncClient, nonce: str, url: str, **kwargs: Any) -> httpx.Response:
    """A request from the browser holding `nonce` in its login cookie."""
    client.cookies.clear()
    client.cookies.set(NONCE_COOKIE, nonce)
    return await client.get(url, **kwargs)


async def start_login(client: httpx.AsyncClient) -> tuple[str, str]:
    """`/oauth/login`, then the portal's authorize page: the redirect back and the browser nonce."""
    login = await client.get("/oauth/login")
    assert login.status_code == 302
    nonce = login.cookies[NONCE_COOKIE]
    async with httpx.AsyncClient() as browser:
        authorize = await browser.get(login.headers["location"])
    assert authorize.status_code == 302
    return authorize.headers["location"], nonce


async def test_login_redirects_to_the_portal_with_client_id_and_state(
    client: httpx.AsyncClient, portal: FakePortal
) -> None:
    response = await client.get("/oauth/login")

    location = urlsplit(response.headers["location"])
    query = parse_qs(location.query)
    assert f"{location.scheme}://{location.netloc}{location.path}" == f"{portal.url}/oauth/authorize/"
    assert query["client_id"] == [portal.config.client_id]
    assert len(query["state"][0]) >= 32
    assert "client_secret" not in response.headers["location"]
    assert "httponly" in response.headers["set-cookie"].lower()


async def test_callback_exchanges_the_code_and_stores_tokens(
    client: httpx.AsyncClient, portal: FakePortal, settings: Settings
) -> None:
    redirect, nonce = await start_login(client)
    assert redirect.startswith(f"{APP_URL}/app?")

    response = await get_with_nonce(client, nonce, redirect.removeprefix(APP_URL))

    assert response.status_code == 200, response.text
    record = json.loads(settings.token_file.read_text())["portals"][portal.config.member_id]
    assert record["client_endpoint"] == portal.client_endpoint
    assert record["domain"] == portal.domain  # not the token reply's `domain` (the OAuth server)
    assert portal.stats["code_exchanges"] == 1


async def test_state_is_single_use(client: httpx.AsyncClient, portal: FakePortal) -> None:
    redirect, nonce = await start_login(client)
    path = redirect.removeprefix(APP_URL).replace("/app?", "/oauth/callback?")
    await get_with_nonce(client, nonce, path)

    again = await get_with_nonce(client, nonce, path)

    assert again.status_code == 400
    assert portal.stats["code_exchanges"] == 1


@pytest.mark.parametrize("tamper", ["wrong_state", "no_state", "other_browser"])
async def test_bad_state_is_refused_and_no_code_is_exchanged(
    client: httpx.AsyncClient, portal: FakePortal, settings: Settings, tamper: str
) -> None:
    redirect, nonce = await start_login(client)
    query = parse_qs(urlsplit(redirect).query)
    code, state = query["code"][0], query["state"][0]
    params = {"code": code, "state": state}
    if tamper == "wrong_state":
        params["state"] = state[::-1]
    elif tamper == "no_state":
        del params["state"]
    else:
        nonce = "another-browser"

    response = await get_with_nonce(
        client, nonce, "/oauth/callback", params=params, headers={"Accept": "text/html"}
    )

    assert response.status_code == 400
    assert "text/html" in response.headers["content-type"]
    assert portal.stats["code_exchanges"] == 0
    assert not settings.token_file.exists()


async def test_login_for_another_domain_is_refused_when_a_portal_is_configured(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/oauth/login", params={"domain": "evil.bitrix24.ru"})

    assert response.status_code == 403
