"""/health and the status page."""

import httpx
import pytest

from tests.conftest import answer_for, post_form
from tests.fake_portal import FakePortal

pytestmark = pytest.mark.anyio


async def test_health_before_install(client: httpx.AsyncClient) -> None:
    response = await client.get("/health")

    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["portal_connected"] is False
    assert body["missing_settings"] == []


async def test_health_and_status_page_after_a_robot_run(
    installed: httpx.AsyncClient, portal: FakePortal
) -> None:
    token, body = portal.robot_call_body({"first_name": "Ivan", "last_name": "Ivanov"})
    await post_form(installed, "/robot", body)
    await answer_for(portal, token)

    health = (await installed.get("/health")).json()
    page = await installed.post(
        "/app", content=b"AUTH_ID=x", headers={"Content-Type": "application/x-www-form-urlencoded"}
    )

    assert health["portal_connected"] is True
    assert health["robot_registered"] is True
    assert health["queue"]["done"] == 1
    assert health["queue"]["pending"] == 0
    assert page.status_code == 200
    assert portal.domain in page.text
    assert "done" in page.text
    assert portal.application_token not in page.text


async def test_corrupt_token_file_is_reported_not_overwritten(
    client: httpx.AsyncClient, portal: FakePortal, settings: object
) -> None:
    from config import Settings

    assert isinstance(settings, Settings)
    settings.token_file.write_text("{not json")

    health = (await client.get("/health")).json()
    install = await post_form(client, "/install", portal.install_event_body())

    assert "unreadable" in health["token_store_error"]
    assert install.status_code == 503
    assert settings.token_file.read_text() == "{not json"
