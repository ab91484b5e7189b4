"""What `bizproc.event.send` means: `true` proves no delivery, ACCESS_DENIED is a refused token,
and a call whose `use_subscription` is `N` gets no answer at all."""

import asyncio
import logging

import httpx
import pytest

from tests.conftest import post_form
from tests.fake_portal import FakePortal

pytestmark = pytest.mark.anyio
GOOD = {"last_name": "Ivanov", "first_name": "Ivan", "phone": "+79991234567"}


async def queue_reaches(client: httpx.AsyncClient, state: str, count: int) -> dict[str, int]:
    """The queue figures once `state` has `count` jobs (or after 10 s, for the assertion to fail)."""
    for _ in range(500):
        stats: dict[str, int] = (await client.get("/health")).json()["queue"]
        if stats[state] >= count:
            break
        await asyncio.sleep(0.02)
    return stats


async def test_call_without_subscription_creates_the_contact_and_sends_no_answer(
    installed: httpx.AsyncClient, portal: FakePortal
) -> None:
    token, body = portal.robot_call_body(GOOD, use_subscription="N")
    assert "use_subscription=N" in body

    response = await post_form(installed, "/robot", body)

    assert response.status_code == 200
    stats = await queue_reaches(installed, "done", 1)

    assert stats["done"] == 1
    assert len(portal.contacts) == 1
    assert "bizproc.event.send" not in portal.stats["per_method"]
    assert portal.dropped_answers == []
    assert token not in portal.answers


async def test_refused_event_token_is_recorded_as_refused_not_as_an_ended_workflow(
    installed: httpx.AsyncClient, portal: FakePortal, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    portal.fail_next("bizproc.event.send", 403, "ACCESS_DENIED", "Access denied!")
    _, body = portal.robot_call_body(GOOD)

    await post_form(installed, "/robot", body)

    stats = await queue_reaches(installed, "failed", 1)

    assert (stats["failed"], stats["abandoned"]) == (1, 0)
    assert len(portal.contacts) == 1
    assert "refused the event token" in caplog.text
    assert "no longer waits" not in caplog.text
