"""The install trusts what the portal and the authorization server vouch for, not its own body."""

import json
from urllib.parse import quote

import httpx
import pytest

from config import Settings
from tests.conftest import post_form
from tests.fake_portal import FakePortal

pytestmark = pytest.mark.anyio

OTHER_MEMBER_ID = "0123456789abcdef0123456789abcdef"


def replaced(body: str, key: str, value: str) -> str:
    """The body with one field's value replaced, in the portal's own encoding."""
    name = quote(key, safe="")
    pairs = [
        pair if not pair.startswith(name + "=") else f"{name}={quote(value, safe='')}"
        for pair in body.split("&")
    ]
    return "&".join(pairs)


def stored(settings: Settings) -> dict[str, dict[str, object]]:
    if not settings.token_file.exists():
        return {}
    portals: dict[str, dict[str, object]] = json.loads(settings.token_file.read_text())["portals"]
    return portals


async def test_the_rest_address_is_the_verified_host_with_path_rest(
    client: httpx.AsyncClient, portal: FakePortal, settings: Settings
) -> None:
    # Same host, a path of the caller's choosing: the app must not POST tokens there.
    body = replaced(portal.install_event_body(), "auth[client_endpoint]", portal.url + "/_fake/stats/")

    response = await post_form(client, "/install", body)

    assert response.status_code == 200, response.text
    assert stored(settings)[portal.config.member_id]["client_endpoint"] == portal.url + "/rest/"


async def test_an_install_naming_another_member_id_is_refused_and_stores_nothing(
    client: httpx.AsyncClient, portal: FakePortal, settings: Settings
) -> None:
    # Valid tokens of our portal, but the body claims another portal's id.
    body = replaced(portal.install_event_body(), "auth[member_id]", OTHER_MEMBER_ID)

    response = await post_form(client, "/install", body)

    assert response.status_code == 403, response.text
    assert response.json()["error"] == "install_rejected"
    assert stored(settings) == {}


async def test_the_stored_record_is_the_one_the_authorization_server_names(
    client: httpx.AsyncClient, portal: FakePortal, settings: Settings
) -> None:
    response = await post_form(client, "/install", portal.install_event_body())

    assert response.status_code == 200, response.text
    assert list(stored(settings)) == [portal.config.member_id]


async def test_a_forged_install_leaves_the_secret_registry_alone(
    client: httpx.AsyncClient, portal: FakePortal
) -> None:
    # Registering each forged token would rebuild the log's secret pattern on every request of a
    # flood, slowing every genuine call's log line (measured in bench/attacks.py).
    from services import observability

    forged = "f0" * 16
    body = replaced(portal.install_event_body(), "auth[access_token]", forged)

    response = await post_form(client, "/install", body)

    assert response.status_code == 403, response.text
    assert forged not in observability._SECRETS
