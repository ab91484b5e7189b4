"""Shared fixtures: a fake Bitrix24 portal on 127.0.0.1 and the app wired to it."""

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from config import Settings, get_settings
from main import create_app
from schemas import PortalTokens
from tests.fake_portal import FakePortal, FakePortalConfig
from tests.pg_server import TestPostgres

APP_URL = "http://robot.example.test"  # a dotted host: the portal refuses others as HANDLER
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def portal_config() -> FakePortalConfig:
    return FakePortalConfig(redirect_uri=f"{APP_URL}/app")


@pytest.fixture
def portal(portal_config: FakePortalConfig) -> Iterator[FakePortal]:
    with FakePortal(portal_config) as running:
        yield running


def make_settings(tmp_path: Path, portal: FakePortal, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "bitrix_client_id": portal.config.client_id,
        "bitrix_client_secret": portal.config.client_secret,
        "app_base_url": APP_URL,
        "bitrix_portal_url": portal.url,
        "bitrix_oauth_url": portal.url,
        "token_file": tmp_path / "tokens.json",
        "job_db_file": tmp_path / "jobs.sqlite3",
        "batch_linger_seconds": 0.01,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def write_installed_portal(portal: FakePortal, token_file: Path) -> PortalTokens:
    """A token file holding the pair the portal's install page hands out, as the app stores it."""
    _, body = portal.iframe_install()
    fields = dict(pair.split("=", 1) for pair in body.split("&"))
    record = PortalTokens(
        member_id=portal.config.member_id,
        domain=portal.domain,
        client_endpoint=portal.client_endpoint,
        access_token=fields["AUTH_ID"],
        refresh_token=fields["REFRESH_ID"],
        expires_at=time.time() + 3600,
    )
    token_file.write_text(json.dumps({"version": 1, "portals": {record.member_id: record.model_dump()}}))
    return record


@pytest.fixture
def settings(tmp_path: Path, portal: FakePortal) -> Settings:
    return make_settings(tmp_path, portal)


@pytest.fixture
def app(settings: Settings) -> FastAPI:
    application = create_app()
    application.dependency_overrides[get_settings] = lambda: settings
    return application


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with (
        LifespanManager(app) as manager,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=manager.app), base_url=APP_URL) as http,
    ):
        yield http


async def post_form(client: httpx.AsyncClient, path: str, body: str, **kwargs: Any) -> httpx.Response:
    """POST a raw form body exactly as the portal sends it."""
    return await client.post(path, content=body.encode(), headers=FORM, **kwargs)


@pytest.fixture
async def installed(client: httpx.AsyncClient, portal: FakePortal) -> httpx.AsyncClient:
    """The app, installed on the fake portal through the ONAPPINSTALL event."""
    response = await post_form(client, "/install", portal.install_event_body())
    assert response.status_code == 200, response.text
    return client


async def eventually(check: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Wait, without blocking the event loop the app's worker runs on, until `check()` holds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def answer_for(portal: FakePortal, event_token: str, timeout: float = 10.0) -> dict[str, Any]:
    await eventually(lambda: event_token in portal.answers, timeout, "the workflow's answer")
    answer: dict[str, Any] = portal.answers[event_token]
    return answer


@pytest.fixture(scope="session")
def pg_server() -> Iterator[TestPostgres]:
    """One real PostgreSQL for the whole run, started by the first test that needs it."""
    server = TestPostgres()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["embedded", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    """The back end a test runs against: tests that take it run once for each."""
    name: str = request.param
    return name


@pytest.fixture
def database_url(backend: str, request: pytest.FixtureRequest) -> str | None:
    """None for the embedded back end; else the URL of a fresh, empty database."""
    if backend == "embedded":
        return None
    server: TestPostgres = request.getfixturevalue("pg_server")
    return server.new_database()
