"""The robot stays registered: ONAPPUPDATE, the check at start, plans without automation rules,
handler addresses the portal refuses, a portal that hangs during the install, and whose token the
robot's calls carry (AUTH_USER_ID)."""

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager

from config import Settings, get_settings
from main import create_app
from repositories.token_store import JsonTokenStore
from services.bitrix_client import BitrixClient
from services.rate_limit import PortalRateLimiter
from services.retry import RetryPolicy
from services.robot_registration import CHECK_INTERVAL_SECONDS, RobotRegistration
from tests.conftest import APP_URL, eventually, make_settings, post_form
from tests.fake_portal import FakePortal, FakePortalConfig

pytestmark = pytest.mark.anyio
BOUND = 10.0  # generous: the install itself is bounded by INSTALL_TIMEOUT_SECONDS (1 s below)


@asynccontextmanager
async def running_app(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app()
    app.dependency_overrides[get_settings] = lambda: settings
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url=APP_URL) as client:
            yield client


def stored(settings: Settings) -> dict[str, Any]:
    portals: dict[str, Any] = json.loads(settings.token_file.read_text())["portals"]
    return portals


# --- 5: ONAPPUPDATE ----------------------------------------------------------------------------


async def test_install_binds_onappupdate_to_the_update_endpoint(
    installed: httpx.AsyncClient, portal: FakePortal
) -> None:
    bound = {(e["event"], e["handler"]) for e in portal.bound_events}

    assert ("ONAPPUPDATE", f"{APP_URL}/update") in bound
    assert ("ONAPPUNINSTALL", f"{APP_URL}/uninstall") in bound


async def test_app_update_registers_the_robot_again(installed: httpx.AsyncClient, portal: FakePortal) -> None:
    body = portal.update_event_body()  # the portal deletes the app's robots on update
    assert portal.robots == {}

    response = await post_form(installed, "/update", body)

    assert response.status_code == 200, response.text
    await eventually(lambda: "create_contact" in portal.robots, what="the robot registered again")
    assert portal.robots["create_contact"]["HANDLER"] == f"{APP_URL}/robot"


async def test_update_event_with_another_application_token_is_refused_and_changes_nothing(
    installed: httpx.AsyncClient, portal: FakePortal, settings: Settings
) -> None:
    before = settings.token_file.read_bytes()
    body = portal.update_event_body()  # real, live tokens ...
    forged = body.replace(portal.application_token, "0" * 32)  # ... but not the portal's secret

    response = await post_form(installed, "/update", forged)

    assert response.status_code == 403
    assert response.json()["error"] == "invalid_application_token"
    assert settings.token_file.read_bytes() == before
    assert portal.robots == {}


async def test_update_from_an_unknown_portal_is_401(client: httpx.AsyncClient, portal: FakePortal) -> None:
    response = await post_form(client, "/update", portal.update_event_body())

    assert response.status_code == 401


# --- 5: at start (and every hour), in the process that leads the job worker --------------------


async def test_start_registers_the_robot_again_when_the_portal_lost_it(
    tmp_path: Path, portal: FakePortal
) -> None:
    settings = make_settings(tmp_path, portal)
    async with running_app(settings) as client:
        assert (await post_form(client, "/install", portal.install_event_body())).status_code == 200
    portal.delete_robots()

    async with running_app(settings):
        await eventually(lambda: "create_contact" in portal.robots, what="the robot registered at start")


async def test_start_updates_the_robot_to_the_current_definition(tmp_path: Path, portal: FakePortal) -> None:
    async with running_app(make_settings(tmp_path, portal)) as client:
        assert (await post_form(client, "/install", portal.install_event_body())).status_code == 200
    moved = make_settings(tmp_path, portal, app_base_url="https://robot.example.com")

    async with running_app(moved):
        await eventually(
            lambda: portal.robots["create_contact"]["HANDLER"] == "https://robot.example.com/robot",
            what="the robot updated at start",
        )
    assert portal.stats["per_method"].get("bizproc.robot.update", 0) >= 1


async def test_the_check_runs_again_every_hour(
    installed: httpx.AsyncClient, portal: FakePortal, settings: Settings
) -> None:
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 1:
            portal.delete_robots()  # lost between two checks
            return
        raise asyncio.CancelledError

    tokens = JsonTokenStore(settings.token_file)
    async with httpx.AsyncClient() as http:
        bitrix = BitrixClient(http, tokens, settings, PortalRateLimiter(50, 2.0))
        robots = RobotRegistration(settings, tokens, bitrix, RetryPolicy(), sleep=sleep)
        with pytest.raises(asyncio.CancelledError):
            await robots.keep_registered()

    assert waits == [CHECK_INTERVAL_SECONDS, CHECK_INTERVAL_SECONDS] == [3600.0, 3600.0]
    assert "create_contact" in portal.robots


# --- 5: a plan without automation rules ----------------------------------------------------------


@pytest.mark.parametrize("portal_config", [FakePortalConfig(automation_rules=False)])
async def test_plan_without_automation_rules_is_said_in_plain_words(
    client: httpx.AsyncClient, portal: FakePortal, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    query, body = portal.iframe_install()

    response = await post_form(client, f"/install?{query}", body)
    page = await post_form(client, f"/app?{query}", body)

    assert response.status_code == 409
    assert response.json()["error"] == "automation_unavailable"
    assert "automation rules" in response.json()["detail"]
    assert "upstream" not in response.json()["detail"].lower()
    assert "automation rules" in caplog.text
    assert "automation rules" in page.text  # the status page in the portal frame


# --- 6: a handler address the portal refuses -----------------------------------------------------


async def test_dotless_app_base_url_is_refused_and_the_install_says_what_to_change(
    tmp_path: Path, portal: FakePortal
) -> None:
    settings = make_settings(tmp_path, portal, app_base_url="http://localhost:8000")
    async with running_app(settings) as client:
        response = await post_form(client, "/install", portal.install_event_body())

    assert response.status_code == 409
    assert response.json()["error"] == "handler_url_refused"
    assert "APP_BASE_URL" in response.json()["detail"]
    assert "localhost" in response.json()["detail"]
    assert "ERROR_WRONG_HANDLER_URL" in "".join(portal.recent_errors)
    assert portal.robots == {}


# --- 5: a portal that hangs during the install -------------------------------------------------------


async def test_install_against_a_hanging_portal_answers_in_time_and_registers_later(
    tmp_path: Path, portal: FakePortal
) -> None:
    settings = make_settings(tmp_path, portal, install_timeout_seconds=1.0)
    portal.hold_method("event.bind", "bizproc.robot.list", "bizproc.robot.add", "profile")
    async with running_app(settings) as client:
        body = portal.install_event_body()
        response = await asyncio.wait_for(post_form(client, "/install", body), BOUND)

        assert response.status_code == 200, response.text
        assert response.json()["robot"] == "pending"
        assert portal.robots == {}
        portal.release()
        await eventually(lambda: "create_contact" in portal.robots, what="the robot registered later")
        await eventually(lambda: len(portal.bound_events) == 2, what="the events bound later")
        health = (await client.get("/health")).json()
    assert health["robot_registered"] is True


async def test_install_when_the_portal_hangs_before_the_proof_is_502_in_time(
    tmp_path: Path, portal: FakePortal
) -> None:
    settings = make_settings(tmp_path, portal, install_timeout_seconds=1.0)
    portal.hold_method("app.info")
    async with running_app(settings) as client:
        response = await asyncio.wait_for(post_form(client, "/install", portal.install_event_body()), BOUND)
        portal.release()

    assert response.status_code == 502
    assert "did not answer" in response.json()["detail"]
    assert not settings.token_file.exists()


async def test_install_when_app_info_hangs_says_what_the_readme_quotes(
    tmp_path: Path, portal: FakePortal
) -> None:
    # The default INSTALL_TIMEOUT_SECONDS (15 s) is longer than the proof's own limit (i10-hostile's
    # PROOF_TIMEOUT_SECONDS, 5 s): that limit decides, and the install says so as the README does.
    settings = make_settings(tmp_path, portal)
    portal.hold_method("app.info")
    async with running_app(settings) as client:
        response = await asyncio.wait_for(post_form(client, "/install", portal.install_event_body()), 30)
        portal.release()

    assert response.status_code == 502
    assert "did not answer within 5 s; nothing was stored" in response.json()["detail"]
    assert not settings.token_file.exists()


# --- 9: who the robot runs as -----------------------------------------------------------------------


@pytest.mark.parametrize("portal_config", [FakePortalConfig(admin_user_id=7, redirect_uri=f"{APP_URL}/app")])
async def test_iframe_install_registers_the_robot_as_the_installing_user(
    client: httpx.AsyncClient, portal: FakePortal
) -> None:
    query, body = portal.iframe_install(user_id=7)  # the iframe POST carries no user id

    response = await post_form(client, f"/install?{query}", body)

    assert response.status_code == 200, response.text
    assert portal.robots["create_contact"]["AUTH_USER_ID"] == 7
    assert portal.stats["per_method"].get("profile", 0) >= 1


@pytest.mark.parametrize("portal_config", [FakePortalConfig(admin_user_id=7, redirect_uri=f"{APP_URL}/app")])
async def test_event_install_registers_the_robot_as_the_installing_user(
    client: httpx.AsyncClient, portal: FakePortal
) -> None:
    response = await post_form(client, "/install", portal.install_event_body(user_id=7))

    assert response.status_code == 200, response.text
    assert portal.robots["create_contact"]["AUTH_USER_ID"] == 7
