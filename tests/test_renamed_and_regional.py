"""Renamed portals and the authorization server of the portal's region, end to end.

The fake portals claim public names (`https://b24-old.bitrix24.ru`) and listen on 127.0.0.1;
`HostRouting` sends the app's requests for those names to them, so the app's own host checks run
as in production.
"""

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager

from config import Settings, get_settings
from main import create_app
from schemas import PortalTokens
from services.portal_moves import move_advice
from tests.conftest import APP_URL, answer_for, eventually, post_form
from tests.fake_portal import FakePortal, FakePortalConfig
from tests.host_routing import HostRouting

pytestmark = pytest.mark.anyio

OLD, NEW = "https://b24-old.bitrix24.ru", "https://b24-new.bitrix24.ru"
RU_OAUTH, WORLD_OAUTH = "https://oauth.bitrix24.tech", "https://oauth.bitrix.info"
GOOD = {"last_name": "Ivanov", "first_name": "Ivan", "phone": "+79991234567"}


def _settings(tmp_path: Path, portal: FakePortal, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "bitrix_client_id": portal.config.client_id,
        "bitrix_client_secret": portal.config.client_secret,
        "app_base_url": APP_URL,
        "token_file": tmp_path / "tokens.json",
        "job_db_file": tmp_path / "jobs.sqlite3",
        "batch_linger_seconds": 0.01,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@asynccontextmanager
async def _app(settings: Settings, routing: HostRouting) -> AsyncIterator[httpx.AsyncClient]:
    application = create_app()
    application.dependency_overrides[get_settings] = lambda: settings
    application.state.bitrix_transport = routing
    async with (
        LifespanManager(application) as manager,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=manager.app), base_url=APP_URL) as http,
    ):
        yield http


@pytest.fixture
def ru_portal() -> Iterator[FakePortal]:
    config = FakePortalConfig(redirect_uri=f"{APP_URL}/app", public_url=OLD, oauth_url=RU_OAUTH)
    with FakePortal(config) as running:
        yield running


@pytest.fixture
def routing(ru_portal: FakePortal) -> HostRouting:
    routes = HostRouting()
    routes.route(OLD, ru_portal.bound_url)
    routes.route(NEW, ru_portal.bound_url)
    routes.route(RU_OAUTH, ru_portal.bound_url)
    return routes


def _stored(settings: Settings) -> dict[str, Any]:
    records: dict[str, Any] = json.loads(settings.token_file.read_text())["portals"]
    return records


# --- renamed portals ------------------------------------------------------------------------------


async def test_a_renamed_portal_keeps_working_without_a_reinstall(
    tmp_path: Path, ru_portal: FakePortal, routing: HostRouting
) -> None:
    settings = _settings(tmp_path, ru_portal)
    async with _app(settings, routing) as app:
        assert (await post_form(app, "/install", ru_portal.install_event_body())).status_code == 200
        ru_portal.rename(NEW)  # the old host now answers 302 to the new one

        token, body = ru_portal.robot_call_body(GOOD)  # the call names the new domain
        response = await post_form(app, "/robot", body)

        assert response.status_code == 200, response.text
        answer = await answer_for(ru_portal, token)
        assert answer["return_values"]["error"] == ""
        assert [c["LAST_NAME"] for c in ru_portal.contacts] == ["Ivanov"]  # the POST body survived the 302
    record = next(iter(_stored(settings).values()))
    assert record["client_endpoint"] == f"{NEW}/rest/"
    assert record["renamed_from"] == "b24-old.bitrix24.ru"


async def test_a_pinned_old_address_refuses_and_names_the_setting(
    tmp_path: Path, ru_portal: FakePortal, routing: HostRouting, caplog: pytest.LogCaptureFixture
) -> None:
    settings = _settings(tmp_path, ru_portal, bitrix_portal_url=OLD)
    async with _app(settings, routing) as app:
        assert (await post_form(app, "/install", ru_portal.install_event_body())).status_code == 200
        token, body = ru_portal.robot_call_body(GOOD)  # accepted before the rename...
        ru_portal.hold()
        assert (await post_form(app, "/robot", body)).status_code == 200
        ru_portal.rename(NEW)
        ru_portal.release()  # ...and its REST calls meet the 302

        await eventually(lambda: "set BITRIX_PORTAL_URL=https://b24-new.bitrix24.ru" in caplog.text)
        # The advice is logged as the move is refused; the record notes it a moment later.
        await eventually(lambda: bool(next(iter(_stored(settings).values())).get("moved_to")))
        _, later = ru_portal.robot_call_body(GOOD)
        refused = await post_form(app, "/robot", later)

        assert refused.status_code == 403
        assert ru_portal.contacts == []
        assert token not in ru_portal.answers
    record = next(iter(_stored(settings).values()))
    assert record["client_endpoint"] == f"{OLD}/rest/"
    assert record["moved_to"] == f"{NEW}/rest/"
    assert move_advice(PortalTokens.model_validate(record)) == (
        "The portal b24-old.bitrix24.ru has moved to b24-new.bitrix24.ru: "
        "set BITRIX_PORTAL_URL=https://b24-new.bitrix24.ru and restart the app."
    )
    assert "b24-new.bitrix24.ru" not in routing.seen  # the token never went to the unconfirmed host


# --- the authorization server of the portal's region ----------------------------------------------


async def test_tokens_are_refreshed_at_the_portals_regional_server(
    tmp_path: Path, ru_portal: FakePortal, routing: HostRouting
) -> None:
    settings = _settings(tmp_path, ru_portal)  # BITRIX_OAUTH_URL stays https://oauth.bitrix.info
    async with _app(settings, routing) as app:
        assert (await post_form(app, "/install", ru_portal.install_event_body())).status_code == 200
        ru_portal.expire_access_tokens()

        token, body = ru_portal.robot_call_body(GOOD)
        assert (await post_form(app, "/robot", body)).status_code == 200

        await answer_for(ru_portal, token)
    # The install's refresh (which vouches for its member_id) and the robot call's, both regional.
    assert set(ru_portal.token_hosts) == {"oauth.bitrix24.tech"}
    assert "oauth.bitrix.info" not in routing.seen


async def test_one_deployment_serves_portals_of_both_regions(
    tmp_path: Path, ru_portal: FakePortal, routing: HostRouting
) -> None:
    world = "https://b24-world.bitrix24.com"
    config = FakePortalConfig(
        public_url=world, oauth_url=WORLD_OAUTH, member_id="b" * 32, client_id=ru_portal.config.client_id,
        client_secret=ru_portal.config.client_secret,
    )  # fmt: skip
    with FakePortal(config) as world_portal:
        routing.route(world, world_portal.bound_url)
        routing.route(WORLD_OAUTH, world_portal.bound_url)
        settings = _settings(tmp_path, ru_portal)
        async with _app(settings, routing) as app:
            for portal in (ru_portal, world_portal):
                assert (await post_form(app, "/install", portal.install_event_body())).status_code == 200
                portal.expire_access_tokens()
            for portal in (ru_portal, world_portal):
                token, body = portal.robot_call_body(GOOD)
                assert (await post_form(app, "/robot", body)).status_code == 200
                await answer_for(portal, token)
        assert set(world_portal.token_hosts) == {"oauth.bitrix.info"}  # install and refresh
    assert set(ru_portal.token_hosts) == {"oauth.bitrix24.tech"}


async def test_the_secret_goes_to_no_server_a_request_names(
    tmp_path: Path, ru_portal: FakePortal, routing: HostRouting
) -> None:
    routing.route(WORLD_OAUTH, ru_portal.bound_url)  # BITRIX_OAUTH_URL below
    settings = _settings(tmp_path, ru_portal)
    body = ru_portal.install_event_body().replace(
        "oauth.bitrix24.tech%2Frest%2F", "evil.example%2Frest%2F"
    )  # a forged server_endpoint
    async with _app(settings, routing) as app:
        # The install's vouching refresh goes to BITRIX_OAUTH_URL, not the forged host; the pair
        # lives at the regional server, so that refresh fails and the forged install is refused.
        response = await post_form(app, "/install", body)
        assert response.status_code == 403, response.text
    assert "evil.example" not in routing.seen
    assert ru_portal.token_hosts == ["oauth.bitrix.info"]  # BITRIX_OAUTH_URL, not the forged host


async def test_the_code_is_exchanged_at_the_server_the_redirect_names(
    tmp_path: Path, ru_portal: FakePortal, routing: HostRouting
) -> None:
    settings = _settings(tmp_path, ru_portal, bitrix_portal_url=OLD)
    async with _app(settings, routing) as app:
        login = await app.get("/oauth/login")
        state = httpx.URL(login.headers["location"]).params["state"]
        callback = httpx.URL(ru_portal.authorize_redirect(state))
        assert callback.params["server_domain"] == "oauth.bitrix24.tech"

        response = await app.get(f"/oauth/callback?{callback.query.decode()}")

        assert response.status_code == 200, response.text
    assert ru_portal.token_hosts == ["oauth.bitrix24.tech"]
