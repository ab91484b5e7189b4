"""Install end to end against the fake portal: both variants, idempotent, and only our portal."""

import json
import os
import stat
from pathlib import Path

import httpx
import pytest

from config import Settings
from tests.conftest import APP_URL, post_form
from tests.fake_portal import FakePortal

pytestmark = pytest.mark.anyio


def stored(settings: Settings) -> dict[str, dict[str, object]]:
    portals: dict[str, dict[str, object]] = json.loads(settings.token_file.read_text())["portals"]
    return portals


async def test_install_event_stores_tokens_and_registers_robot(
    client: httpx.AsyncClient, portal: FakePortal, settings: Settings
) -> None:
    response = await post_form(client, "/install", portal.install_event_body())

    assert response.status_code == 200
    assert response.json()["status"] == "installed"
    record = stored(settings)[portal.config.member_id]
    assert record["application_token"] == portal.application_token
    assert record["client_endpoint"] == portal.client_endpoint
    assert record["refresh_token"]
    assert record["access_token"]
    if os.name == "posix":
        assert stat.S_IMODE(settings.token_file.stat().st_mode) == 0o600
    robot = portal.robots["create_contact"]
    assert robot["HANDLER"] == f"{APP_URL}/robot"
    assert robot["USE_SUBSCRIPTION"] == "Y"
    assert set(robot["PROPERTIES"]) == {
        *("last_name", "first_name", "second_name", "phone", "email"),
        *("duplicates", "responsible"),
    }
    assert robot["PROPERTIES"]["last_name"]["Name"] == {"ru": "Фамилия", "en": "Last name"}
    assert set(robot["RETURN_PROPERTIES"]) == {"contact_id", "error", "duplicate"}
    assert robot["RETURN_PROPERTIES"]["contact_id"]["Type"] == "int"
    assert {"event": "ONAPPUNINSTALL", "handler": f"{APP_URL}/uninstall"} in [
        {"event": e["event"], "handler": e["handler"]} for e in portal.bound_events
    ]


async def test_installing_again_updates_the_robot(client: httpx.AsyncClient, portal: FakePortal) -> None:
    first = await post_form(client, "/install", portal.install_event_body())
    second = await post_form(client, "/install", portal.install_event_body())

    assert first.status_code == second.status_code == 200
    assert list(portal.robots) == ["create_contact"]
    assert portal.stats["per_method"].get("bizproc.robot.update") == 1


async def test_iframe_install_answers_with_install_finish_page(
    client: httpx.AsyncClient, portal: FakePortal, settings: Settings
) -> None:
    query, body = portal.iframe_install()

    response = await post_form(client, f"/install?{query}", body)

    assert response.status_code == 200
    assert "text/html" in response.headers["content-type"]
    assert "BX24.installFinish()" in response.text
    assert stored(settings)[portal.config.member_id]["application_token"] == portal.application_token
    assert "create_contact" in portal.robots


async def test_install_with_tokens_the_portal_does_not_know_is_refused(
    client: httpx.AsyncClient, portal: FakePortal, settings: Settings
) -> None:
    body = portal.install_event_body()
    real = body.split("auth%5Baccess_token%5D=")[1].split("&")[0]
    forged = body.replace(real, "forged0access0token0000000000000")

    response = await post_form(client, "/install", forged)

    assert response.status_code == 403
    assert response.json()["error"] == "install_rejected"
    assert not settings.token_file.exists()
    assert portal.robots == {}


async def test_install_from_another_portal_is_refused_and_keeps_stored_tokens(
    installed: httpx.AsyncClient, portal: FakePortal, settings: Settings
) -> None:
    before = settings.token_file.read_bytes()
    with FakePortal() as stranger:
        response = await post_form(installed, "/install", stranger.install_event_body())

    assert response.status_code == 403
    assert response.json()["error"] == "foreign_portal"
    assert settings.token_file.read_bytes() == before


async def test_install_naming_our_domain_with_a_foreign_endpoint_is_refused(
    client: httpx.AsyncClient, portal: FakePortal, settings: Settings
) -> None:
    body = portal.install_event_body().replace(
        "auth%5Bclient_endpoint%5D=http%3A%2F%2F127.0.0.1", "auth%5Bclient_endpoint%5D=http%3A%2F%2F127.0.0.2"
    )

    response = await post_form(client, "/install", body)

    assert response.status_code == 403
    assert not settings.token_file.exists()


async def test_install_without_settings_is_refused_with_503(tmp_path: Path, portal: FakePortal) -> None:
    from asgi_lifespan import LifespanManager

    from config import get_settings
    from main import create_app

    app = create_app()
    bare = Settings(_env_file=None, token_file=tmp_path / "t.json", job_db_file=tmp_path / "j.sqlite3")  # type: ignore[call-arg]
    app.dependency_overrides[get_settings] = lambda: bare
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url=APP_URL) as client:
            response = await post_form(client, "/install", portal.install_event_body())
            health = await client.get("/health")

    assert response.status_code == 503
    assert response.json()["error"] == "not_configured"
    assert health.status_code == 200
    assert health.json()["missing_settings"] == ["BITRIX_CLIENT_ID", "BITRIX_CLIENT_SECRET"]


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ("event=ONAPPINSTALL&auth%5Bdomain%5D=x", 400),
        ("hello=world", 400),
        ("\x00\xff garbage", 400),
    ],
)
async def test_malformed_install_gets_a_clear_4xx(client: httpx.AsyncClient, body: str, status: int) -> None:
    response = await post_form(client, "/install", body)

    assert response.status_code == status
    assert response.json()["detail"]


async def test_install_as_json_is_refused_with_415(client: httpx.AsyncClient) -> None:
    response = await client.post("/install", json={"event": "ONAPPINSTALL"})

    assert response.status_code == 415


async def test_tokens_of_another_app_on_our_portal_are_refused(tmp_path: Path, portal: FakePortal) -> None:
    from asgi_lifespan import LifespanManager

    from config import get_settings
    from main import create_app
    from tests.conftest import make_settings

    settings = make_settings(tmp_path, portal, bitrix_client_id="local.another0app.00000000")
    app = create_app()
    app.dependency_overrides[get_settings] = lambda: settings
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url=APP_URL) as client:
            response = await post_form(client, "/install", portal.install_event_body())

    assert response.status_code == 403
    assert "another app" in response.json()["detail"]
    assert not settings.token_file.exists()
    assert portal.robots == {}


async def test_install_while_the_portal_is_overloaded_is_502_not_a_refusal(
    client: httpx.AsyncClient, portal: FakePortal, settings: Settings
) -> None:
    portal.fail_next("app.info", 503, "QUERY_LIMIT_EXCEEDED", "Too many requests", times=10)

    response = await post_form(client, "/install", portal.install_event_body())

    assert response.status_code == 502
    assert response.json()["error"] == "upstream_unavailable"
    assert not settings.token_file.exists()
