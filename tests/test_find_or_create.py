"""Find or create, end to end: the robot's `duplicates` and `responsible` inputs through the fake portal."""

from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager

from config import get_settings
from main import create_app
from tests.conftest import APP_URL, answer_for, eventually, make_settings, post_form
from tests.fake_portal import FakePortal, FakePortalConfig

pytestmark = pytest.mark.anyio

PERSON = {
    "last_name": "Ivanov",
    "first_name": "Ivan",
    "phone": "+7 999 123-45-67",
    "email": "ivan@example.com",
}
STORED_PHONE = [{"VALUE": "8 (999) 123-45-67", "VALUE_TYPE": "MOBILE"}]  # another format than the input


async def run(client: httpx.AsyncClient, portal: FakePortal, **properties: str) -> dict[str, Any]:
    token, body = portal.robot_call_body({**PERSON, **properties})
    assert (await post_form(client, "/robot", body)).status_code == 200
    return await answer_for(portal, token)


def returned(answer: dict[str, Any]) -> tuple[int, str, str]:
    values = answer["return_values"]
    return int(values["contact_id"]), values["duplicate"], values["error"]


@pytest.mark.parametrize("mode", [None, "create"])
async def test_create_mode_makes_a_new_contact_even_when_one_exists(
    installed: httpx.AsyncClient, portal: FakePortal, mode: str | None
) -> None:
    existing = portal.add_contact({"LAST_NAME": "Ivanov", "PHONE": STORED_PHONE})

    answer = await run(installed, portal, **({"duplicates": mode} if mode else {}))

    contact_id, duplicate, error = returned(answer)
    assert (duplicate, error) == ("N", "")
    assert contact_id != existing
    assert len(portal.contacts) == 2
    assert answer["log_message"] == f"Contact {contact_id} created"


@pytest.mark.parametrize("mode", ["create", "reuse", "update"])
async def test_every_mode_creates_when_nobody_matches(
    installed: httpx.AsyncClient, portal: FakePortal, mode: str
) -> None:
    portal.add_contact({"LAST_NAME": "Petrov", "PHONE": [{"VALUE": "+79990000000"}]})

    answer = await run(installed, portal, duplicates=mode)

    contact_id, duplicate, error = returned(answer)
    assert (duplicate, error) == ("N", "")
    assert [c["ID"] for c in portal.contacts] == [1, contact_id]
    assert portal.contacts[1]["NAME"] == "Ivan"


async def test_reuse_returns_the_contact_found_by_a_phone_in_another_format(
    installed: httpx.AsyncClient, portal: FakePortal
) -> None:
    existing = portal.add_contact({"LAST_NAME": "Ivanov", "PHONE": STORED_PHONE})

    answer = await run(installed, portal, duplicates="reuse")

    assert returned(answer) == (existing, "Y", "")
    assert answer["log_message"] == f"Found contact {existing} by phone +79991234567"
    assert len(portal.contacts) == 1
    assert portal.contacts[0].get("EMAIL") is None  # reuse changes nothing


async def test_reuse_finds_by_e_mail_regardless_of_case(
    installed: httpx.AsyncClient, portal: FakePortal
) -> None:
    existing = portal.add_contact({"NAME": "Ivan", "EMAIL": [{"VALUE": "IVAN@Example.com"}]})

    answer = await run(installed, portal, duplicates="reuse", phone="")

    assert returned(answer) == (existing, "Y", "")
    assert answer["log_message"] == f"Found contact {existing} by email ivan@example.com"


async def test_several_matches_take_the_oldest_and_say_so(
    installed: httpx.AsyncClient, portal: FakePortal
) -> None:
    oldest = portal.add_contact({"LAST_NAME": "Ivanov", "PHONE": STORED_PHONE})
    portal.add_contact({"LAST_NAME": "Ivanov 2", "PHONE": [{"VALUE": "+79991234567"}]})
    portal.add_contact({"LAST_NAME": "Ivanov 3", "EMAIL": [{"VALUE": "ivan@example.com"}]})

    answer = await run(installed, portal, duplicates="reuse")

    assert returned(answer) == (oldest, "Y", "")
    assert answer["log_message"] == (
        f"Found contact {oldest} by phone +79991234567; 2 contacts match, the oldest was taken"
    )
    assert len(portal.contacts) == 3


async def test_the_phone_wins_over_the_e_mail(installed: httpx.AsyncClient, portal: FakePortal) -> None:
    portal.add_contact({"LAST_NAME": "By mail", "EMAIL": [{"VALUE": "ivan@example.com"}]})
    by_phone = portal.add_contact({"LAST_NAME": "By phone", "PHONE": STORED_PHONE})

    answer = await run(installed, portal, duplicates="reuse")

    assert returned(answer) == (by_phone, "Y", "")
    assert "by phone" in answer["log_message"]


async def test_update_fills_only_the_empty_fields(installed: httpx.AsyncClient, portal: FakePortal) -> None:
    existing = portal.add_contact({"LAST_NAME": "Ivanova", "PHONE": STORED_PHONE})

    answer = await run(installed, portal, duplicates="update", second_name="Ivanovich")

    assert returned(answer) == (existing, "Y", "")
    [contact] = portal.contacts
    assert contact["LAST_NAME"] == "Ivanova"  # filled already: kept
    assert (contact["NAME"], contact["SECOND_NAME"]) == ("Ivan", "Ivanovich")
    assert contact["PHONE"] == STORED_PHONE  # it has this number: nothing added
    assert contact["EMAIL"] == [{"VALUE": "ivan@example.com", "VALUE_TYPE": "WORK"}]
    assert answer["log_message"] == (
        f"Found contact {existing} by phone +79991234567; filled in: EMAIL, NAME, SECOND_NAME"
    )


async def test_update_adds_the_phone_it_lacks_beside_the_ones_it_has(
    installed: httpx.AsyncClient, portal: FakePortal
) -> None:
    other = [{"VALUE": "+74951112233", "VALUE_TYPE": "WORK"}]
    existing = portal.add_contact(
        {"NAME": "Ivan", "LAST_NAME": "Ivanov", "PHONE": other, "EMAIL": [{"VALUE": "ivan@example.com"}]}
    )

    answer = await run(installed, portal, duplicates="update")

    assert returned(answer) == (existing, "Y", "")
    assert portal.contacts[0]["PHONE"] == [*other, {"VALUE": "+79991234567", "VALUE_TYPE": "WORK"}]
    assert "by email" in answer["log_message"]


async def test_update_with_nothing_to_fill_sends_no_update(
    installed: httpx.AsyncClient, portal: FakePortal
) -> None:
    existing = portal.add_contact(
        {
            "NAME": "Ivan",
            "LAST_NAME": "Ivanov",
            "PHONE": STORED_PHONE,
            "EMAIL": [{"VALUE": "ivan@example.com"}],
        }
    )

    answer = await run(installed, portal, duplicates="update")

    assert returned(answer) == (existing, "Y", "")
    assert "crm.contact.update" not in portal.stats["per_method"]


async def test_responsible_becomes_the_assigned_user(
    installed: httpx.AsyncClient, portal: FakePortal
) -> None:
    answer = await run(installed, portal, responsible="user_7")

    _, _, error = returned(answer)
    assert error == ""
    assert portal.contacts[0]["ASSIGNED_BY_ID"] == "7"  # form-encoded, as the portal received it


async def test_empty_responsible_leaves_the_portal_default(
    installed: httpx.AsyncClient, portal: FakePortal
) -> None:
    answer = await run(installed, portal, responsible="")

    assert returned(answer)[2] == ""
    assert "ASSIGNED_BY_ID" not in portal.contacts[0]  # the portal assigns the calling user


@pytest.mark.parametrize(
    ("properties", "reason"),
    [({"responsible": "group_e1"}, "responsible"), ({"duplicates": "merge"}, "duplicates")],
)
async def test_unusable_new_inputs_answer_with_the_reason(
    installed: httpx.AsyncClient, portal: FakePortal, properties: dict[str, str], reason: str
) -> None:
    answer = await run(installed, portal, **properties)

    assert returned(answer)[0] == 0
    assert reason in answer["return_values"]["error"]
    assert portal.contacts == []


async def one_pass(tmp_path: Path, portal: FakePortal, calls: list[dict[str, str]]) -> list[dict[str, Any]]:
    """Journal the calls while the portal stalls, stop, start again: the restart claims them in one pass."""
    settings = make_settings(tmp_path, portal)
    tokens: list[str] = []
    for run_index in range(2):
        app = create_app()
        app.dependency_overrides[get_settings] = lambda: settings
        async with LifespanManager(app) as manager:
            transport = httpx.ASGITransport(app=manager.app)
            async with httpx.AsyncClient(transport=transport, base_url=APP_URL) as client:
                if run_index == 0:
                    await post_form(client, "/install", portal.install_event_body())
                    portal.hold()
                    for properties in calls:
                        token, body = portal.robot_call_body(properties)
                        assert (await post_form(client, "/robot", body)).status_code == 200
                        tokens.append(token)
                    await eventually(lambda: portal.stats["held_requests"] > 0, 10, "a request in flight")
                    continue
                portal.release()
                return [await answer_for(portal, token, timeout=20) for token in tokens]
    raise AssertionError("unreachable")


async def test_two_calls_for_one_new_person_in_one_pass_make_one_contact(
    tmp_path: Path, portal: FakePortal
) -> None:
    same_mail = {**PERSON, "phone": "", "email": "IVAN@example.com", "duplicates": "reuse"}
    calls = [{**PERSON, "duplicates": "reuse"}, {**PERSON, "duplicates": "reuse"}, same_mail]

    answers = await one_pass(tmp_path, portal, calls)

    [contact] = portal.contacts
    assert [returned(a) for a in answers] == [(contact["ID"], "N", ""), *[(contact["ID"], "Y", "")] * 2]
    assert answers[1]["log_message"] == f"Found contact {contact['ID']} by phone +79991234567"
    assert answers[2]["log_message"] == f"Found contact {contact['ID']} by email IVAN@example.com"
    assert portal.stats["per_method"]["crm.contact.add"] == 1


async def test_one_search_and_one_read_serve_a_pass_of_a_hundred_calls(
    tmp_path: Path, portal: FakePortal
) -> None:
    """A pass holds 100 jobs, two batches of adds or answers: its search and read serve them all,
    so half found and half new costs search, read, add and two answers (not twice search, read,
    add, answer for two passes of 50)."""
    phones = [f"+7999100{i:04d}" for i in range(100)]
    existing = {
        i: portal.add_contact({"LAST_NAME": "Ivanov", "PHONE": [{"VALUE": phones[i]}]})
        for i in range(0, 100, 2)
    }
    calls = [
        {**PERSON, "phone": phone, "email": f"p{i}@example.com", "duplicates": "reuse"}
        for i, phone in enumerate(phones)
    ]

    answers = await one_pass(tmp_path, portal, calls)

    for i, answer in enumerate(answers):
        contact_id, duplicate, error = returned(answer)
        assert (duplicate, error) == ("Y" if i in existing else "N", "")
        assert contact_id == existing[i] if i in existing else contact_id > len(existing)
    assert len(portal.contacts) == 100
    assert portal.stats["per_method"]["crm.contact.list"] == 1  # one read command for the 50 found
    assert portal.stats["per_method"]["crm.contact.add"] == 50


async def test_update_for_a_person_created_in_the_same_pass_fills_on_the_next(
    tmp_path: Path, portal: FakePortal
) -> None:
    calls = [
        {**PERSON, "duplicates": "reuse"},
        {**PERSON, "second_name": "Petrovich", "duplicates": "update"},
    ]

    one, two = await one_pass(tmp_path, portal, calls)

    [contact] = portal.contacts
    assert returned(one) == (contact["ID"], "N", "")
    assert returned(two) == (contact["ID"], "Y", "")
    assert contact["SECOND_NAME"] == "Petrovich"


async def test_a_failed_search_is_retried_not_read_as_nobody(
    installed: httpx.AsyncClient, portal: FakePortal
) -> None:
    existing = portal.add_contact({"LAST_NAME": "Ivanov", "PHONE": STORED_PHONE})
    portal.fail_next("crm.duplicate.findbycomm", 503, "QUERY_LIMIT_EXCEEDED", "Too many requests")

    answer = await run(installed, portal, duplicates="reuse")

    assert returned(answer) == (existing, "Y", "")
    assert len(portal.contacts) == 1


async def test_old_workflows_without_the_new_inputs_still_create(
    installed: httpx.AsyncClient, portal: FakePortal
) -> None:
    portal.add_contact({"LAST_NAME": "Ivanov", "PHONE": STORED_PHONE})
    token, body = portal.robot_call_body(PERSON)  # the portal sends `duplicates`' default: create
    assert "properties%5Bduplicates%5D=create" in body
    assert "properties%5Bresponsible%5D=&" in body

    await post_form(installed, "/robot", body)

    assert returned(await answer_for(portal, token))[1] == "N"
    assert len(portal.contacts) == 2


async def test_installed_robot_with_the_old_definition_gets_the_new_one(
    installed: httpx.AsyncClient, portal: FakePortal
) -> None:
    # The portal still has the robot as the previous version registered it (five inputs).
    old = {key: portal.robots["create_contact"]["PROPERTIES"][key] for key in PERSON}
    portal.set_robot_properties("create_contact", old)
    token, body = portal.robot_call_body(PERSON)
    assert "duplicates" not in body  # an old robot has no such input, so no default is sent

    # The install path's add-or-update (bizproc.robot.update) brings the new definition.
    assert (await post_form(installed, "/install", portal.install_event_body())).status_code == 200

    robot = portal.robots["create_contact"]
    assert {"duplicates", "responsible"} <= set(robot["PROPERTIES"])
    assert robot["PROPERTIES"]["duplicates"]["Type"] == "select"
    assert set(robot["PROPERTIES"]["duplicates"]["Options"]) == {"create", "reuse", "update"}
    assert robot["PROPERTIES"]["responsible"]["Type"] == "user"
    assert "duplicate" in robot["RETURN_PROPERTIES"]
    await post_form(installed, "/robot", body)
    assert returned(await answer_for(portal, token))[1] == "N"


async def test_the_check_at_start_gives_an_installed_robot_the_new_inputs(
    tmp_path: Path, portal: FakePortal
) -> None:
    settings = make_settings(tmp_path, portal)
    for run_index in range(2):  # install; then the portal has the old definition; then a restart
        app = create_app()
        app.dependency_overrides[get_settings] = lambda: settings
        async with LifespanManager(app) as manager:
            transport = httpx.ASGITransport(app=manager.app)
            async with httpx.AsyncClient(transport=transport, base_url=APP_URL) as client:
                if run_index == 0:
                    assert (
                        await post_form(client, "/install", portal.install_event_body())
                    ).status_code == 200
                    await eventually(lambda: "create_contact" in portal.robots, what="the robot registered")
                    old = {key: portal.robots["create_contact"]["PROPERTIES"][key] for key in PERSON}
                    portal.set_robot_properties("create_contact", old)
                    continue
                await eventually(
                    lambda: "duplicates" in portal.robots["create_contact"]["PROPERTIES"],
                    what="the robot updated at start",
                )
    assert portal.robots["create_contact"]["PROPERTIES"]["responsible"]["Type"] == "user"


async def test_a_refused_search_answers_with_the_reason_and_creates_nothing(
    installed: httpx.AsyncClient, portal: FakePortal
) -> None:
    portal.fail_next("crm.duplicate.findbycomm", 403, "Access denied", "")

    answer = await run(installed, portal, duplicates="reuse")

    assert returned(answer)[:2] == (0, "N")
    assert answer["return_values"]["error"].startswith("Existing contacts could not be searched: ")
    assert "Access denied" in answer["return_values"]["error"]
    assert portal.contacts == []


async def test_a_russian_portal_reads_the_found_note_in_russian(tmp_path: Path) -> None:
    with FakePortal(FakePortalConfig(language="ru", redirect_uri=f"{APP_URL}/app")) as portal:
        existing = portal.add_contact({"LAST_NAME": "Ivanov", "PHONE": STORED_PHONE})
        [answer] = await one_pass(tmp_path, portal, [{**PERSON, "duplicates": "reuse"}])

    assert returned(answer) == (existing, "Y", "")
    assert answer["log_message"] == f"Найден контакт {existing} по телефону +79991234567"


async def test_a_fill_whose_reply_is_lost_adds_the_phone_once(
    tmp_path: Path, portal: FakePortal, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `update` adds a missing phone as a row without ID (crm-contact-update.md): run twice, the
    # contact gets it twice. The portal may have run a request whose reply was lost (i8-journal's
    # may_have_run), so the client must not send the fill again by itself; the job's retry
    # recomputes the fill against the contact as it now is.
    import asyncio
    import sqlite3

    other = [{"VALUE": "+74951112233", "VALUE_TYPE": "WORK"}]
    existing = portal.add_contact(
        {"NAME": "Ivan", "LAST_NAME": "Ivanov", "PHONE": other, "EMAIL": [{"VALUE": "ivan@example.com"}]}
    )
    monkeypatch.setattr("services.find_or_create.SETTLE_SECONDS", 2.0)  # the portal's 60 s, shortened
    settings = make_settings(tmp_path, portal, http_timeout_seconds=1.0)
    app = create_app()
    app.dependency_overrides[get_settings] = lambda: settings

    def attempts() -> int:
        with sqlite3.connect(settings.job_db_file) as db:
            return int(db.execute("SELECT COALESCE(MAX(attempts), 0) FROM jobs").fetchone()[0])

    async with (
        LifespanManager(app) as manager,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=manager.app), base_url=APP_URL) as client,
    ):
        assert (await post_form(client, "/install", portal.install_event_body())).status_code == 200
        portal.hold(replies=True, after=2)  # the search and the read are answered; the fill's reply is lost
        token, body = portal.robot_call_body({**PERSON, "duplicates": "update"})
        assert (await post_form(client, "/robot", body)).status_code == 200
        await eventually(lambda: attempts() >= 1, timeout=60, what="the job retried after the lost reply")
        portal.release()
        answer = await asyncio.wait_for(answer_for(portal, token), 60)

    assert returned(answer) == (existing, "Y", "")
    assert portal.contacts[0]["PHONE"] == [*other, {"VALUE": "+79991234567", "VALUE_TYPE": "WORK"}]
