"""The fake portal's find-or-create surface behaves as the portal core and the REST docs describe."""

from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qsl

import httpx
import pytest

from tests.fake_portal import FakePortal, FakePortalConfig, build_php_query, parse_php_query


@pytest.fixture
def portal() -> Iterator[FakePortal]:
    with FakePortal(FakePortalConfig(rate_burst=None)) as running:
        yield running


@pytest.fixture
def token(portal: FakePortal) -> str:
    body = parse_php_query(parse_qsl(portal.install_event_body(), keep_blank_values=True))
    value: str = body["auth"]["access_token"]
    return value


def call(portal: FakePortal, token: str, method: str, **params: Any) -> httpx.Response:
    """Form-encoded with PHP brackets, as the app sends it."""
    body = build_php_query({**params, "auth": token})
    headers = {"content-type": "application/x-www-form-urlencoded"}
    return httpx.post(f"{portal.url}/rest/{method}", content=body, headers=headers, timeout=5)


def find(portal: FakePortal, token: str, kind: str, values: Any) -> Any:
    return call(
        portal, token, "crm.duplicate.findbycomm", entity_type="CONTACT", type=kind, values=values
    ).json()


@pytest.mark.parametrize(
    "stored", ["+7 (999) 123-45-67", "8 999 123 45 67", "79991234567", "+7 999 123-45-67 доб. 12"]
)
def test_findbycomm_matches_phones_by_the_portal_match_code(
    portal: FakePortal, token: str, stored: str
) -> None:
    portal.add_contact({"PHONE": [{"VALUE": stored}]})

    assert find(portal, token, "PHONE", ["+79991234567"])["result"] == {"CONTACT": [1]}
    assert find(portal, token, "PHONE", ["8 (999) 1234567"])["result"] == {"CONTACT": [1]}
    assert find(portal, token, "PHONE", ["9991234567"])["result"] == []  # 10 digits: no trunk prefix to read


def test_findbycomm_answers_php_empty_array_and_lower_cases_e_mail(portal: FakePortal, token: str) -> None:
    portal.add_contact({"EMAIL": [{"VALUE": "Ivan@Example.com"}]})

    assert find(portal, token, "EMAIL", ["IVAN@example.COM"])["result"] == {"CONTACT": [1]}
    assert find(portal, token, "EMAIL", ["nobody@example.com"])["result"] == []


def test_findbycomm_refuses_what_the_core_refuses(portal: FakePortal, token: str) -> None:
    assert find(portal, token, "PHONE", "+79991234567")["error"] == "Communication values is not defined"
    assert find(portal, token, "", ["x"])["error"] == "Communication type is not defined"
    assert find(portal, token, "FAX", ["x"])["error"].startswith("Communication type 'FAX'")


def test_findbycomm_searches_twenty_distinct_values(portal: FakePortal, token: str) -> None:
    ids = [portal.add_contact({"PHONE": [{"VALUE": f"+7999000{i:04d}"}]}) for i in range(22)]
    values = [f"+7999000{i:04d}" for i in range(22)]

    assert find(portal, token, "PHONE", values)["result"] == {"CONTACT": ids[:20]}
    repeated = [values[0]] * 5 + values[20:22]  # equal values count once
    assert find(portal, token, "PHONE", repeated)["result"] == {"CONTACT": [ids[0], *ids[20:22]]}


def test_contact_update_adds_changes_and_deletes_multifield_rows(portal: FakePortal, token: str) -> None:
    portal.add_contact(
        {"NAME": "Ivan", "PHONE": [{"VALUE": "+111", "VALUE_TYPE": "WORK"}, {"VALUE": "+222"}]}
    )
    ids = [row["ID"] for row in call(portal, token, "crm.contact.get", id=1).json()["result"]["PHONE"]]

    added = call(
        portal, token, "crm.contact.update", id=1, fields={"PHONE": [{"VALUE": "+333"}], "LAST_NAME": "I"}
    )
    assert added.json()["result"] is True
    phones = call(portal, token, "crm.contact.get", id=1).json()["result"]["PHONE"]
    assert [p["VALUE"] for p in phones] == ["+111", "+222", "+333"]

    change = [{"ID": ids[0], "VALUE": "+444", "VALUE_TYPE": "HOME"}, {"ID": ids[1], "DELETE": "Y"}]
    call(portal, token, "crm.contact.update", id=1, fields={"PHONE": change})
    got = call(portal, token, "crm.contact.get", id=1).json()["result"]
    assert [(p["VALUE"], p["VALUE_TYPE"]) for p in got["PHONE"]] == [("+444", "HOME"), ("+333", "WORK")]
    assert (got["NAME"], got["LAST_NAME"]) == ("Ivan", "I")
    missing = call(portal, token, "crm.contact.update", id=9, fields={"NAME": "x"})
    assert missing.json() == {"error": "", "error_description": "Contact is not found"}


def test_findbycomm_follows_each_update_of_a_contact(portal: FakePortal, token: str) -> None:
    """Match codes are rebuilt on every save: a changed, added or deleted value is found (or not) at once."""
    portal.add_contact({"PHONE": [{"VALUE": "+79990000001"}], "EMAIL": [{"VALUE": "a@example.com"}]})
    ids = [row["ID"] for row in call(portal, token, "crm.contact.get", id=1).json()["result"]["PHONE"]]

    change = [{"ID": ids[0], "VALUE": "+79990000002"}, {"VALUE": "+79990000003"}]
    call(
        portal,
        token,
        "crm.contact.update",
        id=1,
        fields={"PHONE": change, "EMAIL": [{"VALUE": "b@example.com"}]},
    )

    assert find(portal, token, "PHONE", ["+79990000001"])["result"] == []
    assert find(portal, token, "PHONE", ["+79990000002", "+79990000003"])["result"] == {"CONTACT": [1]}
    assert find(portal, token, "EMAIL", ["A@example.com", "b@example.com"])["result"] == {"CONTACT": [1]}
    rows = call(portal, token, "crm.contact.get", id=1).json()["result"]["PHONE"]
    call(
        portal,
        token,
        "crm.contact.update",
        id=1,
        fields={"PHONE": [{"ID": r["ID"], "DELETE": "Y"} for r in rows]},
    )
    assert find(portal, token, "PHONE", ["+79990000002"])["result"] == []


def test_contact_list_by_id_applies_every_condition(portal: FakePortal, token: str) -> None:
    for name in ("Ivan", "Anna", "Ivan"):
        portal.add_contact({"NAME": name})
    select = ["ID", "NAME"]

    listed = call(portal, token, "crm.contact.list", filter={"@ID": [3, 1, 2, 99]}, select=select).json()
    assert [c["ID"] for c in listed["result"]] == ["1", "2", "3"]
    named = call(portal, token, "crm.contact.list", filter={"@ID": [1, 2], "NAME": "Ivan"}, select=select)
    assert [c["ID"] for c in named.json()["result"]] == ["1"]
    assert call(portal, token, "crm.contact.list", filter={"ID": 2}, select=select).json()["total"] == 1


def test_robot_call_sends_every_registered_input_in_the_portal_s_form(portal: FakePortal, token: str) -> None:
    properties = {
        "last_name": {"Name": "Last name", "Type": "string"},
        "duplicates": {"Name": "Mode", "Type": "select", "Options": {"create": "C"}, "Default": "create"},
        "responsible": {"Name": "Who", "Type": "user"},
    }
    robot = {
        "CODE": "create_contact",
        "HANDLER": "http://127.0.0.1/robot",
        "NAME": "R",
        "PROPERTIES": properties,
    }
    assert call(portal, token, "bizproc.robot.add", **robot).json()["result"] is True

    _, body = portal.robot_call_body({"responsible": "user_7", "unknown": "x"})

    sent = parse_php_query(parse_qsl(body, keep_blank_values=True))["properties"]
    # Every registered input, in order; a key the robot lacks only because the test forged it.
    assert sent == {"last_name": "", "duplicates": "create", "responsible": "user_7", "unknown": "x"}
