"""The robot handler end to end: raw portal bodies in, contacts and workflow answers out."""

from urllib.parse import quote

import httpx
import pytest

from config import Settings
from tests.conftest import answer_for, eventually, post_form
from tests.fake_portal import FakePortal

pytestmark = pytest.mark.anyio

GOOD = {
    "last_name": " Ivanov ",
    "first_name": "Ivan",
    "second_name": "Ivanovich",
    "phone": "8 (999) 123-45-67",
    "email": "ivan@example.com",
}


async def test_good_call_creates_the_contact_and_answers_the_workflow(
    installed: httpx.AsyncClient, portal: FakePortal
) -> None:
    token, body = portal.robot_call_body(GOOD)

    response = await post_form(installed, "/robot", body)

    assert response.status_code == 200
    assert response.json()["status"] == "accepted"
    answer = await answer_for(portal, token)
    [contact] = portal.contacts
    assert contact["LAST_NAME"] == "Ivanov"
    assert contact["NAME"] == "Ivan"
    assert contact["SECOND_NAME"] == "Ivanovich"
    assert contact["PHONE"] == [{"VALUE": "+79991234567", "VALUE_TYPE": "WORK"}]
    assert contact["EMAIL"] == [{"VALUE": "ivan@example.com", "VALUE_TYPE": "WORK"}]
    assert int(answer["return_values"]["contact_id"]) == contact["ID"]
    assert answer["return_values"]["error"] == ""
    assert str(contact["ID"]) in answer["log_message"]


@pytest.mark.parametrize(
    ("properties", "reason"),
    [
        ({**GOOD, "email": "not-an-email"}, "e-mail"),
        ({**GOOD, "phone": "call me maybe"}, "phone"),
        ({**GOOD, "phone": "+7 999 12"}, "phone"),
        ({"second_name": "Ivanovich", "phone": "+79991234567"}, "name"),
        ({}, "name"),
        ({**GOOD, "last_name": "x" * 51}, "longer than 50"),
    ],
)
async def test_bad_data_creates_nothing_and_still_answers_with_the_reason(
    installed: httpx.AsyncClient, portal: FakePortal, properties: dict[str, str], reason: str
) -> None:
    token, body = portal.robot_call_body(properties)

    response = await post_form(installed, "/robot", body)

    assert response.status_code == 200
    answer = await answer_for(portal, token)
    assert portal.contacts == []
    assert int(answer["return_values"]["contact_id"]) == 0
    assert reason in answer["return_values"]["error"]
    assert answer["log_message"] == answer["return_values"]["error"]


async def test_first_name_alone_is_enough(installed: httpx.AsyncClient, portal: FakePortal) -> None:
    token, body = portal.robot_call_body({"first_name": "Anna"})

    await post_form(installed, "/robot", body)

    answer = await answer_for(portal, token)
    assert answer["return_values"]["error"] == ""
    assert portal.contacts[0]["NAME"] == "Anna"


async def test_same_event_token_twice_creates_one_contact(
    installed: httpx.AsyncClient, portal: FakePortal
) -> None:
    token, body = portal.robot_call_body(GOOD)

    first = await post_form(installed, "/robot", body)
    second = await post_form(installed, "/robot", body)

    assert (first.status_code, second.status_code) == (200, 200)
    assert second.json() == {"status": "duplicate", "job_id": first.json()["job_id"]}
    await answer_for(portal, token)
    assert len(portal.contacts) == 1
    assert len(portal.answers) == 1


async def test_portal_refusing_one_contact_does_not_fail_its_neighbours(
    installed: httpx.AsyncClient, portal: FakePortal
) -> None:
    portal.hold()
    calls = [portal.robot_call_body({**GOOD, "first_name": f"N{i}"}) for i in range(5)]
    for _, body in calls:
        await post_form(installed, "/robot", body)
    portal.fail_next("crm.contact.add", 400, "", "Access denied", times=1)
    portal.release()

    answers = [await answer_for(portal, token) for token, _ in calls]

    errors = [a["return_values"]["error"] for a in answers]
    assert sum(1 for e in errors if "Access denied" in e) == 1
    assert sum(1 for e in errors if e == "") == 4
    assert len(portal.contacts) == 4


async def test_burst_is_batched(installed: httpx.AsyncClient, portal: FakePortal) -> None:
    portal.hold()
    calls = [portal.robot_call_body({**GOOD, "first_name": f"N{i}"}) for i in range(120)]
    for _, body in calls:
        assert (await post_form(installed, "/robot", body)).status_code == 200
    before = portal.stats["rest_requests"]
    portal.release()

    await eventually(lambda: len(portal.answers) == 120, 20, "120 answers")

    assert len(portal.contacts) == 120
    assert len({c["ORIGIN_ID"] for c in portal.contacts}) == 120
    # 120 calls fit in 3 batches of contacts and 3 of answers; allow a little slack for timing.
    assert portal.stats["rest_requests"] - before <= 10


async def test_rate_limited_portal_still_gets_every_contact_once(
    installed: httpx.AsyncClient, portal: FakePortal
) -> None:
    portal.set_rate_limit(burst=2, drain=20.0)
    portal.fail_next("batch", 503, "QUERY_LIMIT_EXCEEDED", "Too many requests", times=2)
    calls = [portal.robot_call_body({**GOOD, "first_name": f"N{i}"}) for i in range(60)]
    for _, body in calls:
        assert (await post_form(installed, "/robot", body)).status_code == 200

    await eventually(lambda: len(portal.answers) == 60, 30, "60 answers")

    assert len(portal.contacts) == 60
    assert all(a["return_values"]["error"] == "" for a in portal.answers.values())


async def test_expired_access_token_is_refreshed_once(
    installed: httpx.AsyncClient, portal: FakePortal, settings: Settings
) -> None:
    before = settings.token_file.read_text()
    refreshes = portal.stats["refreshes"]  # the install refreshed once, to learn its member_id
    portal.expire_access_tokens()
    token, body = portal.robot_call_body(GOOD)

    await post_form(installed, "/robot", body)

    answer = await answer_for(portal, token)
    assert answer["return_values"]["error"] == ""
    assert portal.stats["refreshes"] == refreshes + 1
    assert settings.token_file.read_text() != before


async def test_dead_refresh_token_still_answers_the_workflow(
    installed: httpx.AsyncClient, portal: FakePortal
) -> None:
    portal.expire_access_tokens()
    portal.fail_next("oauth.token", 400, "invalid_grant", "Invalid grant", times=5)
    token, body = portal.robot_call_body(GOOD)

    await post_form(installed, "/robot", body)

    answer = await answer_for(portal, token)
    assert int(answer["return_values"]["contact_id"]) == 0
    assert "/oauth/login" in answer["return_values"]["error"]
    assert portal.contacts == []


async def test_unknown_portal_is_refused_with_401(installed: httpx.AsyncClient, portal: FakePortal) -> None:
    _, body = portal.robot_call_body(GOOD)
    body = body.replace(portal.config.member_id, "0" * 32)

    response = await post_form(installed, "/robot", body)

    assert response.status_code == 401
    assert response.json()["error"] == "unknown_portal"


async def test_wrong_application_token_is_refused_with_403(
    installed: httpx.AsyncClient, portal: FakePortal
) -> None:
    _, body = portal.robot_call_body(GOOD, application_token="f" * 32)

    response = await post_form(installed, "/robot", body)

    assert response.status_code == 403
    assert response.json()["error"] == "invalid_application_token"


async def test_call_naming_another_domain_is_refused(
    installed: httpx.AsyncClient, portal: FakePortal
) -> None:
    _, body = portal.robot_call_body(GOOD)
    body = body.replace(
        f"auth%5Bdomain%5D={quote(portal.domain, safe='')}", "auth%5Bdomain%5D=evil.bitrix24.ru"
    )
    assert "evil.bitrix24.ru" in body

    response = await post_form(installed, "/robot", body)

    assert response.status_code == 403


async def test_refused_calls_change_nothing(installed: httpx.AsyncClient, portal: FakePortal) -> None:
    _, body = portal.robot_call_body(GOOD, application_token="f" * 32)
    await post_form(installed, "/robot", body)

    health = (await installed.get("/health")).json()

    assert health["queue"]["pending"] == 0
    assert health["queue"]["done"] == 0
    assert portal.contacts == []


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ("", 400),
        ("hello=world", 400),
        ("event_token=abc", 400),
        ("%%%garbage&&&==", 400),
    ],
)
async def test_body_that_is_no_robot_call_gets_400(
    installed: httpx.AsyncClient, body: str, status: int
) -> None:
    response = await post_form(installed, "/robot", body)

    assert response.status_code == status
    assert response.json()["error"] == "bad_request"


async def test_json_body_gets_415(installed: httpx.AsyncClient) -> None:
    response = await installed.post("/robot", json={"event_token": "x"})

    assert response.status_code == 415


async def test_body_over_one_megabyte_gets_413(installed: httpx.AsyncClient, portal: FakePortal) -> None:
    _, body = portal.robot_call_body({**GOOD, "second_name": "x" * (1024 * 1024)})

    response = await post_form(installed, "/robot", body)

    assert response.status_code == 413
    assert portal.contacts == []
