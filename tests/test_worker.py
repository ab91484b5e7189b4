"""The job worker against the fake portal: retries within a budget, resumption."""

import asyncio
from pathlib import Path

import httpx
import pytest
from asgi_lifespan import LifespanManager

from config import get_settings
from main import create_app
from tests.conftest import APP_URL, answer_for, eventually, make_settings, post_form
from tests.fake_portal import FakePortal

pytestmark = pytest.mark.anyio
GOOD = {"last_name": "Ivanov", "first_name": "Ivan", "phone": "+79991234567"}


async def test_transient_failures_are_retried_until_the_contact_is_made(
    installed: httpx.AsyncClient, portal: FakePortal
) -> None:
    portal.fail_next("batch", 503, "QUERY_LIMIT_EXCEEDED", "Too many requests", times=3)
    portal.fail_next("crm.contact.add", 500, "INTERNAL_SERVER_ERROR", "Internal server error", times=2)
    token, body = portal.robot_call_body(GOOD)

    await post_form(installed, "/robot", body)

    answer = await answer_for(portal, token, timeout=20)
    assert answer["return_values"]["error"] == ""
    assert len(portal.contacts) == 1


async def test_spent_budget_answers_the_workflow_with_the_error(tmp_path: Path, portal: FakePortal) -> None:
    settings = make_settings(tmp_path, portal, job_retry_budget_seconds=2.0)
    app = create_app()
    app.dependency_overrides[get_settings] = lambda: settings
    portal.fail_next("crm.contact.add", 503, "QUERY_LIMIT_EXCEEDED", "Too many requests", times=1000)
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url=APP_URL) as client:
            await post_form(client, "/install", portal.install_event_body())
            token, body = portal.robot_call_body(GOOD)
            await post_form(client, "/robot", body)
            answer = await answer_for(portal, token, timeout=15)

    assert int(answer["return_values"]["contact_id"]) == 0
    assert "could not be created in time" in answer["return_values"]["error"]
    assert portal.contacts == []


async def test_timeout_duration_caps_the_budget(installed: httpx.AsyncClient, portal: FakePortal) -> None:
    portal.fail_next("crm.contact.add", 503, "QUERY_LIMIT_EXCEEDED", "Too many requests", times=1000)
    token, body = portal.robot_call_body(GOOD, timeout_duration=2)

    await post_form(installed, "/robot", body)

    answer = await answer_for(portal, token, timeout=15)
    assert "could not be created in time" in answer["return_values"]["error"]


async def test_jobs_left_by_a_stopped_app_are_resumed_on_start(tmp_path: Path, portal: FakePortal) -> None:
    settings = make_settings(tmp_path, portal)
    tokens: list[str] = []
    for _ in range(2):  # first run accepts and stops before the portal answers; second run resumes
        app = create_app()
        app.dependency_overrides[get_settings] = lambda: settings
        async with LifespanManager(app) as manager:
            transport = httpx.ASGITransport(app=manager.app)
            async with httpx.AsyncClient(transport=transport, base_url=APP_URL) as client:
                if not tokens:
                    await post_form(client, "/install", portal.install_event_body())
                    portal.hold()
                    for i in range(3):
                        token, body = portal.robot_call_body({**GOOD, "first_name": f"N{i}"})
                        assert (await post_form(client, "/robot", body)).status_code == 200
                        tokens.append(token)
                    await eventually(lambda: portal.stats["held_requests"] > 0, 10, "a request in flight")
                    continue
                portal.release()
                await eventually(lambda: len(portal.answers) == 3, 15, "3 answers after restart")

    assert sorted(portal.answers) == sorted(tokens)
    assert len(portal.contacts) == 3


async def test_worker_survives_a_journal_failure(
    installed: httpx.AsyncClient, portal: FakePortal, monkeypatch: pytest.MonkeyPatch
) -> None:
    from repositories.job_journal import SqliteJobJournal

    real_next_due = SqliteJobJournal.next_due
    failures = iter([True, True])

    async def flaky_next_due(self: SqliteJobJournal) -> float | None:
        if next(failures, False):
            raise OSError("disk I/O error")
        return await real_next_due(self)

    monkeypatch.setattr(SqliteJobJournal, "next_due", flaky_next_due)
    await asyncio.sleep(1.2)  # the idle worker polls next_due and hits both failures
    token, body = portal.robot_call_body(GOOD)

    await post_form(installed, "/robot", body)

    answer = await answer_for(portal, token, timeout=15)
    assert answer["return_values"]["error"] == ""
    assert next(failures, "spent") == "spent"
