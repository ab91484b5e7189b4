"""Everything the app logs during a full run, at DEBUG, holds none of the secrets it handled."""

import json
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from asgi_lifespan import LifespanManager

from config import get_settings
from main import create_app
from router import NONCE_COOKIE
from tests.conftest import APP_URL, answer_for, make_settings, post_form
from tests.fake_portal import FakePortal

pytestmark = pytest.mark.anyio
SECRET_KEYS = ("access_token", "refresh_token", "application_token", "event_token", "AUTH_ID", "REFRESH_ID")


def secrets_in(body: str) -> set[str]:
    found = set()
    for key, values in parse_qs(body).items():
        if any(key == name or key.endswith(f"[{name}]") for name in SECRET_KEYS):
            found.update(values)
    return found


async def test_full_run_logs_no_secret(
    tmp_path: Path, portal: FakePortal, capfd: pytest.CaptureFixture[str]
) -> None:
    settings = make_settings(tmp_path, portal, log_level="DEBUG")
    app = create_app()
    app.dependency_overrides[get_settings] = lambda: settings
    secrets = {portal.config.client_secret, portal.application_token}
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url=APP_URL) as client:
            install = portal.install_event_body()
            secrets |= secrets_in(install)
            assert (await post_form(client, "/install", install)).status_code == 200
            query, frame = portal.iframe_install()
            secrets |= secrets_in(frame)
            await post_form(client, f"/install?{query}", frame)
            login = await client.get("/oauth/login")
            async with httpx.AsyncClient() as browser:
                redirect = (await browser.get(login.headers["location"])).headers["location"]
            params = parse_qs(urlsplit(redirect).query)
            secrets |= {params["code"][0], params["state"][0], login.cookies[NONCE_COOKIE]}
            await client.get(redirect.removeprefix(APP_URL))  # the client kept the login cookie
            portal.expire_access_tokens()
            for properties in ({"first_name": "Ivan", "phone": "+79991234567"}, {"email": "bad"}):
                token, body = portal.robot_call_body(properties)
                secrets |= secrets_in(body)
                await post_form(client, "/robot", body)
                await answer_for(portal, token)
            await post_form(client, "/robot", portal.robot_call_body({}, application_token="9" * 32)[1])
            for record in json.loads(settings.token_file.read_text())["portals"].values():
                secrets |= {record["access_token"], record["refresh_token"]}
            await post_form(client, "/uninstall", portal.uninstall_event_body())
    logged = capfd.readouterr().err

    assert "POST /robot" in logged  # the log really was captured
    assert portal.stats["refreshes"] >= 1
    leaked = sorted(secret for secret in secrets if secret and secret in logged)
    assert leaked == []
