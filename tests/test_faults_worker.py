"""Portal faults the worker must survive: a slow portal, lost replies, an hour-long outage."""

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager

from config import Settings, get_settings
from main import create_app
from tests.conftest import APP_URL, answer_for, eventually, make_settings, post_form
from tests.fake_portal import FakePortal

pytestmark = pytest.mark.anyio


async def running_app(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app()
    app.dependency_overrides[get_settings] = lambda: settings
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url=APP_URL) as client:
            yield client


async def installed_app(settings: Settings, portal: FakePortal) -> AsyncIterator[httpx.AsyncClient]:
    async for client in running_app(settings):
        assert (await post_form(client, "/install", portal.install_event_body())).status_code == 200
        yield client


@pytest.fixture
async def short_lease(tmp_path: Path, portal: FakePortal) -> AsyncIterator[httpx.AsyncClient]:
    """The app with a one-second lease, installed."""
    async for client in installed_app(make_settings(tmp_path, portal, job_lease_seconds=1.0), portal):
        yield client


@pytest.fixture
async def short_timeout(tmp_path: Path, portal: FakePortal) -> AsyncIterator[httpx.AsyncClient]:
    """The app with a one-second HTTP timeout, installed."""
    async for client in installed_app(make_settings(tmp_path, portal, http_timeout_seconds=1.0), portal):
        yield client


async def send_calls(client: httpx.AsyncClient, portal: FakePortal, count: int) -> list[str]:
    tokens = []
    for i in range(count):
        token, body = portal.robot_call_body({"first_name": f"Ivan{i}", "phone": "+79991234567"})
        assert (await post_form(client, "/robot", body)).status_code == 200
        tokens.append(token)
    return tokens


def methods(portal: FakePortal) -> dict[str, int]:
    return dict(portal.stats["per_method"])


def assert_one_contact_each(portal: FakePortal, tokens: list[str]) -> None:
    assert sorted(portal.answers) == sorted(tokens)
    assert all(answer["return_values"]["error"] == "" for answer in portal.answers.values())
    assert len(portal.contacts) == len(tokens)
    answered = sorted(int(a["return_values"]["contact_id"]) for a in portal.answers.values())
    assert answered == sorted(contact["ID"] for contact in portal.contacts)


async def test_a_portal_slower_than_the_lease_gets_each_job_once(
    short_lease: httpx.AsyncClient, portal: FakePortal
) -> None:
    portal.hold(replies=True)  # the portal works, but its replies take three leases
    tokens = await send_calls(short_lease, portal, 5)
    await eventually(lambda: portal.stats["held_requests"] > 0, 10, "the add batch in flight")
    await asyncio.sleep(3.0)
    portal.release()

    await eventually(lambda: len(portal.answers) == len(tokens), 20, "every answer")
    await asyncio.sleep(1.0)  # a second pass over the same jobs would show up now

    assert_one_contact_each(portal, tokens)
    assert methods(portal).get("crm.contact.add") == len(tokens)
    assert methods(portal).get("bizproc.event.send") == len(tokens)


@pytest.mark.parametrize("fault", ["late", "gateway_502", "then_lookup_fails", "slow_work"])
async def test_a_lost_reply_to_contact_adds_never_duplicates_a_contact(
    short_timeout: httpx.AsyncClient, portal: FakePortal, fault: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The portal's longest request, compressed from a minute to 5 s (the app waits 1 s).
    monkeypatch.setattr("services.worker.PORTAL_REQUEST_SECONDS", 5.0)
    if fault == "late":  # ran and committed; the reply comes after the app's 1 s timeout
        portal.reply_late("batch", delay=2.0)
    elif fault == "slow_work":  # the app gives up at 1 s; the portal creates the contacts at 4 s
        portal.reply_late("batch", delay=4.0, slow_work=True)
    else:  # ran and committed; the gateway answers 502
        portal.reply_late("batch", status=502)
    if fault == "then_lookup_fails":  # and the look-up that follows fails too: still no blind add
        portal.fail_next("crm.contact.list", 500, "INTERNAL_SERVER_ERROR", "Internal error", times=5)
    tokens = await send_calls(short_timeout, portal, 5)

    await eventually(lambda: len(portal.answers) == len(tokens), 30, "every answer")
    await eventually(lambda: portal.stats["held_requests"] == 0, 30, "the slow request's end")

    assert_one_contact_each(portal, tokens)
    assert methods(portal).get("crm.contact.add") == len(tokens)
    assert methods(portal).get("crm.contact.list", 0) >= 1  # the retry looked up by ORIGIN_ID


class ShiftedClock:
    """`time.time` moved forward at will: an hour passes without waiting for it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.offset = 0.0
        real: Callable[[], float] = time.time
        monkeypatch.setattr(time, "time", lambda: real() + self.offset)


@pytest.mark.parametrize("timeout_duration", [None, 0])
async def test_a_portal_outage_of_an_hour_ends_with_the_contact_and_the_answer(
    tmp_path: Path, portal: FakePortal, monkeypatch: pytest.MonkeyPatch, timeout_duration: int | None
) -> None:
    settings = make_settings(tmp_path, portal)
    async for client in running_app(settings):
        assert (await post_form(client, "/install", portal.install_event_body())).status_code == 200
        clock = ShiftedClock(monkeypatch)
        # The portal is down: every REST request gets the gateway's 503 page.
        portal.fail_next("batch", 503, "", "Service Unavailable", times=1_000_000)
        token, body = portal.robot_call_body({"first_name": "Ivan"}, timeout_duration=timeout_duration)
        assert (await post_form(client, "/robot", body)).status_code == 200
        while clock.offset < 3600:
            tried = portal.stats["batches"]
            await eventually(lambda: portal.stats["batches"] > tried, 20, "an attempt within 5 min")  # noqa: B023
            clock.offset += 300  # the backoff is capped at 5 minutes
        portal.clear_failures()
        clock.offset += 300

        answer: dict[str, Any] = await answer_for(portal, token, timeout=30)

    assert answer["return_values"]["error"] == ""
    assert int(answer["return_values"]["contact_id"]) == portal.contacts[0]["ID"]
    assert len(portal.contacts) == 1


async def test_a_workflow_time_limit_still_ends_the_job_with_an_answer(
    installed: httpx.AsyncClient, portal: FakePortal, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = ShiftedClock(monkeypatch)
    portal.fail_next("crm.contact.add", 503, "QUERY_LIMIT_EXCEEDED", "Too many requests", times=1_000_000)
    token, body = portal.robot_call_body({"first_name": "Ivan"}, timeout_duration=1800)
    assert (await post_form(installed, "/robot", body)).status_code == 200
    await eventually(lambda: methods(portal).get("crm.contact.add", 0) > 0, 20, "a first attempt")
    clock.offset += 1800

    answer = await answer_for(portal, token, timeout=30)

    assert int(answer["return_values"]["contact_id"]) == 0
    assert "could not be created in time" in answer["return_values"]["error"]
