"""Issue #9 end to end: the app against a fake portal that limits method time, rewrites batch
values as the core does, and answers with the documented error codes."""

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from asgi_lifespan import LifespanManager

from config import get_settings
from main import create_app
from services.bitrix_client import BitrixApiError, BitrixAuthError, api_error
from tests.conftest import APP_URL, answer_for, eventually, make_settings, post_form
from tests.fake_portal import PORTAL_ERRORS, FakePortal, FakePortalConfig

pytestmark = pytest.mark.anyio

GOOD = {"last_name": "Ivanov", "first_name": "Ivan", "phone": "+79991234567"}


@pytest.fixture
def limited_portal() -> Iterator[FakePortal]:
    config = FakePortalConfig(
        redirect_uri=f"{APP_URL}/app",
        operating_limit=1.0,
        operating_window=3.0,  # ten buckets of 0.3 s instead of ten minutes
        operating_costs={"crm.contact.add": 2.0},  # one contact spends the method's whole budget
    )
    with FakePortal(config) as running:
        yield running


@pytest.fixture
async def limited_app(tmp_path: Path, limited_portal: FakePortal) -> AsyncIterator[httpx.AsyncClient]:
    application = create_app()
    settings = make_settings(tmp_path, limited_portal)
    application.dependency_overrides[get_settings] = lambda: settings
    async with (
        LifespanManager(application) as manager,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=manager.app), base_url=APP_URL) as http,
    ):
        assert (await post_form(http, "/install", limited_portal.install_event_body())).status_code == 200
        yield http


async def test_a_time_limited_method_waits_for_its_reset_while_answers_go_on(
    limited_app: httpx.AsyncClient, limited_portal: FakePortal, caplog: pytest.LogCaptureFixture
) -> None:
    first, body = limited_portal.robot_call_body(GOOD)
    assert (await post_form(limited_app, "/robot", body)).status_code == 200
    await answer_for(limited_portal, first)  # crm.contact.add has now used up its time

    second, body = limited_portal.robot_call_body({**GOOD, "last_name": "Petrov"})
    assert (await post_form(limited_app, "/robot", body)).status_code == 200
    await eventually(lambda: "OPERATION_TIME_LIMIT" in str(limited_portal.recent_errors), what="the block")
    third, body = limited_portal.robot_call_body({"phone": "+79991234567"})  # no name: answered at once
    assert (await post_form(limited_app, "/robot", body)).status_code == 200

    refused = await answer_for(limited_portal, third)
    assert "name" in refused["return_values"]["error"]  # bizproc.event.send was not held up
    assert second not in limited_portal.answers
    answer = await answer_for(limited_portal, second, timeout=20)
    assert answer["return_values"]["error"] == ""
    assert [c["LAST_NAME"] for c in limited_portal.contacts] == ["Ivanov", "Petrov"]
    # One refused call, then the call at the reset time: not a retry every few seconds.
    assert limited_portal.stats["per_method"]["crm.contact.add"] == 3
    retries = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Job 2: ")]
    assert len([m for m in retries if "retry in" in m]) == 1  # rescheduled once, for the reset time


async def test_names_that_look_like_batch_references_reach_the_crm_exactly(
    installed: httpx.AsyncClient, portal: FakePortal
) -> None:
    token, body = portal.robot_call_body({"last_name": "$result[x]", "first_name": "$Total[job1]"})

    assert (await post_form(installed, "/robot", body)).status_code == 200

    answer = await answer_for(portal, token)
    [contact] = portal.contacts
    assert contact["LAST_NAME"] == "$result[x]"
    assert contact["NAME"] == "$Total[job1]"
    assert answer["return_values"]["contact_id"] == str(contact["ID"])


async def test_workflow_texts_quoting_such_values_reach_the_workflow_exactly(
    installed: httpx.AsyncClient, portal: FakePortal
) -> None:
    portal.hold()  # job 1 waits at the portal, so jobs 2 and 3 are answered in one batch
    _, body = portal.robot_call_body(GOOD)
    assert (await post_form(installed, "/robot", body)).status_code == 200
    await eventually(lambda: portal.stats["held_requests"] > 0, what="job 1 at the portal")
    plain, body = portal.robot_call_body({"first_name": "A", "email": "nope"})
    assert (await post_form(installed, "/robot", body)).status_code == 200
    quoted, body = portal.robot_call_body({"first_name": "B", "email": "$time[job2][date_start]"})
    assert (await post_form(installed, "/robot", body)).status_code == 200
    await eventually(lambda: portal.stats["held_requests"] > 1, what="the answers at the portal")
    portal.release()

    answer = await answer_for(portal, quoted)
    await answer_for(portal, plain)
    assert '"$time[job2][date_start]"' in answer["return_values"]["error"]
    assert '"$time[job2][date_start]"' in answer["log_message"]


REFUSALS = [
    "WRONG_AUTH_TYPE",
    "INVALID_CREDENTIALS",
    "authorization_error",
    "ERROR_OAUTH",
    "APPLICATION_NOT_FOUND",
    "METHOD_CONFIRM_DENIED",
    "PAYMENT_REQUIRED",
    "insufficient_scope",
    "ACCESS_DENIED",
]


@pytest.mark.parametrize("where", ["crm.contact.add", "batch"])  # one command, or the whole request
@pytest.mark.parametrize("code", REFUSALS)
async def test_a_refusal_is_answered_with_its_hint_and_not_reauthorized(
    installed: httpx.AsyncClient, portal: FakePortal, code: str, where: str
) -> None:
    status, description = PORTAL_ERRORS[code]
    expected = api_error(status, code, description, where)
    refreshes = portal.stats["refreshes"]  # the install's own, which vouches for its member_id
    portal.fail_with(where, code)
    token, body = portal.robot_call_body(GOOD)

    assert (await post_form(installed, "/robot", body)).status_code == 200

    answer = await answer_for(portal, token)
    error = answer["return_values"]["error"]
    assert type(expected) not in (BitrixApiError, BitrixAuthError)  # classified, not "re-authorize"
    assert expected.admin_hint in error
    assert "/oauth/login" not in error
    assert not expected.retryable
    assert portal.contacts == []
    assert portal.stats["refreshes"] == refreshes


async def test_a_method_waiting_for_confirmation_is_retried(
    installed: httpx.AsyncClient, portal: FakePortal
) -> None:
    refreshes = portal.stats["refreshes"]  # the install's own, which vouches for its member_id
    portal.fail_with("crm.contact.add", "METHOD_CONFIRM_WAITING")
    token, body = portal.robot_call_body(GOOD)

    assert (await post_form(installed, "/robot", body)).status_code == 200

    answer = await answer_for(portal, token, timeout=20)
    assert answer["return_values"]["error"] == ""
    assert len(portal.contacts) == 1
    assert portal.stats["refreshes"] == refreshes
