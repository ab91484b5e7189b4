"""/health and the status page."""

import asyncio
import os
import stat
import time
from pathlib import Path

import httpx
import pytest
from asgi_lifespan import LifespanManager

from config import Settings, get_settings
from main import create_app
from tests.conftest import answer_for, post_form
from tests.fake_portal import FakePortal

pytestmark = pytest.mark.anyio


async def test_health_before_install(client: httpx.AsyncClient) -> None:
    response = await client.get("/health")

    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "degraded"
    assert body["portal_connected"] is False
    assert body["missing_settings"] == []


async def test_health_and_status_page_after_a_robot_run(
    installed: httpx.AsyncClient, portal: FakePortal
) -> None:
    token, body = portal.robot_call_body({"first_name": "Ivan", "email": "not-an-email"})
    await post_form(installed, "/robot", body)
    await answer_for(portal, token)
    query, frame = portal.iframe_install()

    # The portal has the answer a moment before the journal records it.
    deadline = time.monotonic() + 10
    while (health := (await installed.get("/health")).json())["queue"]["done"] < 1:
        assert time.monotonic() < deadline, "the journal never recorded the answer"
        await asyncio.sleep(0.02)
    page = await post_form(installed, f"/app?{query}", frame)

    assert health["portal_connected"] is True
    assert health["robot_registered"] is True
    assert health["queue"]["done"] == 1
    assert health["queue"]["pending"] == 0
    assert portal.config.member_id not in str(health)
    assert page.status_code == 200
    assert portal.domain in page.text
    assert "not-an-email" in page.text  # the last run's error, for the portal's own users
    assert portal.application_token not in page.text


@pytest.mark.parametrize("forged", ["no_body", "wrong_token"])
async def test_status_page_shows_no_details_to_strangers(
    installed: httpx.AsyncClient, portal: FakePortal, forged: str
) -> None:
    token, body = portal.robot_call_body({"first_name": "Ivan", "email": "not-an-email"})
    await post_form(installed, "/robot", body)
    await answer_for(portal, token)
    query, frame = portal.iframe_install()
    frame = frame.replace(portal.application_token, "0" * 32)

    if forged == "no_body":
        page = await installed.get("/app")
    else:
        page = await post_form(installed, f"/app?{query}", frame)

    assert page.status_code == 200
    assert "A portal is connected" in page.text
    assert "not-an-email" not in page.text
    assert portal.config.member_id not in page.text


async def test_status_page_without_settings_names_them(tmp_path: Path) -> None:
    app = create_app()
    bare = Settings(_env_file=None, token_file=tmp_path / "t.json", job_db_file=tmp_path / "j.sqlite3")  # type: ignore[call-arg]
    app.dependency_overrides[get_settings] = lambda: bare
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            page = await client.get("/app")

    assert "BITRIX_CLIENT_ID" in page.text
    assert "BITRIX_CLIENT_SECRET" in page.text


async def test_a_russian_status_page_gives_the_health_reasons_in_russian(client: httpx.AsyncClient) -> None:
    # /health is the monitors' contract and stays English; the page a Russian-speaking
    # administrator opens says the same in Russian.
    health = (await client.get("/health")).json()
    page = await client.get("/app", headers={"Accept-Language": "ru-RU,ru;q=0.9"})

    assert health["reasons"] == ["No portal is installed: install the app in Bitrix24."]
    assert 'data-status="degraded"' in page.text
    assert "No portal is installed" not in page.text
    assert "Ни один портал не установил приложение: установите его в Битрикс24." in page.text


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")
async def test_job_journal_is_private(installed: httpx.AsyncClient, settings: Settings) -> None:
    assert stat.S_IMODE(settings.job_db_file.stat().st_mode) == 0o600


async def test_corrupt_token_file_is_reported_not_overwritten(
    client: httpx.AsyncClient, portal: FakePortal, settings: Settings
) -> None:
    settings.token_file.write_text("{not json")

    health = (await client.get("/health")).json()
    install = await post_form(client, "/install", portal.install_event_body())

    assert "unreadable" in health["token_store_error"]
    assert install.status_code == 503
    assert settings.token_file.read_text() == "{not json"
