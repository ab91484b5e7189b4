"""The app end to end on each back end: the same robot calls, answers and refresh on both."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import httpx
import pytest
from asgi_lifespan import LifespanManager
from cryptography.fernet import Fernet
from fastapi import FastAPI
from pydantic import SecretStr

from config import Settings, get_settings
from main import create_app
from repositories.token_store import TokenKeyMismatch
from tests.conftest import APP_URL, answer_for, make_settings, post_form
from tests.fake_portal import FakePortal
from tests.pg_server import TestPostgres

pytestmark = pytest.mark.anyio
KEY = Fernet.generate_key().decode()


@pytest.fixture
def settings(tmp_path: Path, portal: FakePortal, database_url: str | None) -> Settings:
    return make_settings(tmp_path, portal, database_url=database_url, token_encryption_key=KEY)


def app_for(settings: Settings) -> FastAPI:
    application = create_app()
    application.dependency_overrides[get_settings] = lambda: settings
    return application


async def test_robot_calls_are_answered_once_each(
    installed: httpx.AsyncClient, portal: FakePortal, backend: str
) -> None:
    tokens: list[str] = []
    for i in range(5):
        token, body = portal.robot_call_body({"first_name": f"Ivan{i}", "phone": "+79991234567"})
        assert (await post_form(installed, "/robot", body)).status_code == 200
        tokens.append(token)
    # A redelivery of the first call is acknowledged and not worked on twice.
    _, again = portal.robot_call_body({"first_name": "Ivan0"}, event_token=tokens[0])
    assert (await post_form(installed, "/robot", again)).status_code == 200
    answers = [await answer_for(portal, token) for token in tokens]
    assert all(answer["return_values"]["error"] == "" for answer in answers)
    assert len(portal.contacts) == 5
    health = (await installed.get("/health")).json()
    assert health["cluster"]["backend"] == backend
    assert health["cluster"]["worker_leader"] == health["cluster"]["instance"]
    # The journal records "done" just after the portal took the answers.
    for _ in range(500):
        if (await installed.get("/health")).json()["queue"]["done"] == 5:
            break
        await anyio.sleep(0.02)
    queue = (await installed.get("/health")).json()["queue"]
    assert (queue["done"], queue["pending"], queue["failed"]) == (5, 0, 0)


async def test_concurrent_calls_on_an_expired_token_refresh_once(
    installed: httpx.AsyncClient, portal: FakePortal
) -> None:
    portal.expire_access_tokens()
    refreshes = portal.stats["refreshes"]
    bodies = [portal.robot_call_body({"first_name": f"Petr{i}"}) for i in range(20)]
    async with anyio.create_task_group() as group:
        for _, body in bodies:
            group.start_soon(post_form, installed, "/robot", body)
    for token, _ in bodies:
        await answer_for(portal, token)
    assert portal.stats["refreshes"] == refreshes + 1


async def test_a_wrong_encryption_key_stops_the_start_and_keeps_the_tokens(
    installed: httpx.AsyncClient, settings: Settings, portal: FakePortal
) -> None:
    health = (await installed.get("/health")).json()
    assert health["portal_connected"] is True
    wrong = settings.model_copy(update={"token_encryption_key": SecretStr(Fernet.generate_key().decode())})
    with pytest.raises(TokenKeyMismatch, match="TOKEN_ENCRYPTION_KEY does not decrypt"):
        async with LifespanManager(app_for(wrong)):
            pass
    # The right key still reads everything: nothing was overwritten.
    async with _client(app_for(settings)) as again:
        assert (await again.get("/health")).json()["portal_connected"] is True


@asynccontextmanager
async def _client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with (
        LifespanManager(app) as manager,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=manager.app), base_url=APP_URL) as http,
    ):
        yield http


async def test_a_database_outage_gives_503_and_the_app_recovers(
    tmp_path: Path, portal: FakePortal, pg_server: TestPostgres
) -> None:
    url = pg_server.new_database()
    name = url.rsplit("/", 1)[1]
    async with _client(app_for(make_settings(tmp_path, portal, database_url=url))) as http:
        assert (await post_form(http, "/install", portal.install_event_body())).status_code == 200
        # The database refuses every session: the pool's open connections die, new ones fail.
        pg_server.psql(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
        pg_server.psql(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'")  # noqa: S608
        token, body = portal.robot_call_body({"first_name": "Outage"})
        refused = await post_form(http, "/robot", body)
        assert refused.status_code == 503
        assert refused.json()["error"] == "storage_error"
        assert "DATABASE_URL" in refused.json()["detail"]
        pg_server.psql(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
        # The portal does not resend, but a retried call (or the next one) is taken and done.
        accepted = await post_form(http, "/robot", body)
        assert accepted.status_code == 200
        answer = await answer_for(portal, token, timeout=20)
        assert answer["return_values"]["error"] == ""


async def test_a_found_contact_is_answered_as_a_duplicate(
    installed: httpx.AsyncClient, portal: FakePortal, backend: str
) -> None:
    existing = portal.add_contact({"LAST_NAME": "Ivanov", "PHONE": [{"VALUE": "8 999 123 45 67"}]})
    token, body = portal.robot_call_body(
        {"first_name": "Ivan", "phone": "+79991234567", "duplicates": "reuse"}
    )

    assert (await post_form(installed, "/robot", body)).status_code == 200

    answer = await answer_for(portal, token)
    assert (int(answer["return_values"]["contact_id"]), answer["return_values"]["duplicate"]) == (
        existing,
        "Y",
    )
    assert answer["log_message"] == f"Found contact {existing} by phone +79991234567"  # the journaled note
    assert len(portal.contacts) == 1
