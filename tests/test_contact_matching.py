"""The find-or-create decision, as pure functions: inputs, search commands, matches, fills."""

from typing import Any

import pytest

from services.contact_matching import (
    Found,
    Wanted,
    decide,
    found_ids,
    read_commands,
    read_found,
    read_mode,
    read_responsible,
    search_commands,
)
from services.contact_validation import InvalidContactData


def wanted(job_id: int, mode: str = "reuse", phone: str = "", email: str = "", **names: str) -> Wanted:
    fields: dict[str, Any] = dict(names)
    if phone:
        fields["PHONE"] = [{"VALUE": phone, "VALUE_TYPE": "WORK"}]
    if email:
        fields["EMAIL"] = [{"VALUE": email, "VALUE_TYPE": "WORK"}]
    return Wanted(job_id, mode, fields)  # type: ignore[arg-type]


def contact(
    contact_id: int, phones: tuple[str, ...] = (), emails: tuple[str, ...] = (), **names: str
) -> Found:
    return Found(contact_id, names, frozenset(phones), frozenset(emails))


@pytest.mark.parametrize(
    ("raw", "user"), [("user_7", 7), ("7", 7), (" user_12 ", 12), ("", None), (["user_3"], 3)]
)
def test_responsible_in_the_forms_the_portal_sends(raw: Any, user: int | None) -> None:
    assert read_responsible({"responsible": raw}) == user


@pytest.mark.parametrize("raw", ["group_e1", "author", "user_", "user_0", "Ivan"])
def test_responsible_that_is_not_one_user_is_refused(raw: str) -> None:
    with pytest.raises(InvalidContactData, match="responsible"):
        read_responsible({"responsible": raw})


def test_mode_defaults_to_create_and_refuses_unknown_values() -> None:
    assert read_mode({}) == read_mode({"duplicates": ""}) == "create"
    assert read_mode({"duplicates": "Reuse"}) == "reuse"
    with pytest.raises(InvalidContactData, match="duplicates"):
        read_mode({"duplicates": "merge"})


def test_search_sends_twenty_values_a_command_and_skips_create_mode() -> None:
    jobs = [wanted(i, phone=f"+7999000{i:04d}", email=f"p{i}@example.com") for i in range(45)]
    jobs.append(wanted(99, mode="create", phone="+79990009999"))

    commands = search_commands(jobs)

    assert sorted(commands) == [f"find_{kind}_{n}" for kind in ("email", "phone") for n in range(3)]
    sizes = [len(params["values"]) for _, params in commands.values()]
    assert sorted(sizes) == [5, 5, 20, 20, 20, 20]
    assert all(p["entity_type"] == "CONTACT" for _, p in commands.values())
    assert "+79990009999" not in str(commands)


def test_found_ids_read_php_empty_arrays_and_contact_lists() -> None:
    results = {"find_phone_0": [], "find_email_0": {"CONTACT": [5, 3]}, "find_phone_1": {"CONTACT": [3]}}
    assert found_ids(results) == [3, 5]
    assert list(read_commands(list(range(1, 61)))) == ["read_0", "read_1"]


def test_read_found_compares_stored_phones_as_e164() -> None:
    items = [
        {"ID": "4", "NAME": "Ivan", "PHONE": [{"VALUE": "8 (999) 123-45-67"}], "EMAIL": [{"VALUE": "A@b.ru"}]}
    ]
    [found] = read_found({"read_0": items}, "RU").values()
    assert found.phones == {"+79991234567"}
    assert found.emails == {"a@b.ru"}


def test_phone_wins_and_the_oldest_of_several_is_taken() -> None:
    found = {
        9: contact(9, emails=("ivan@example.com",)),
        12: contact(12, ("+7999",)),
        10: contact(10, ("+7999",)),
    }

    [decision] = decide([wanted(1, phone="+7999", email="ivan@example.com")], found)

    assert (decision.action, decision.contact_id, decision.by, decision.matches) == ("found", 10, "phone", 2)
    assert decision.note(10) == "Found contact 10 by phone +7999; 2 contacts match, the oldest was taken"


def test_an_earlier_job_of_the_pass_is_found_by_a_later_one() -> None:
    decisions = decide([wanted(2, email="I@x.ru"), wanted(1, phone="+7999", email="i@x.ru")], {})

    assert [(d.job_id, d.action, d.creator) for d in decisions] == [(1, "create", 0), (2, "found", 1)]


def test_update_fills_empty_fields_once_per_contact() -> None:
    found = {5: contact(5, ("+7999",), LAST_NAME="Ivanova", NAME="")}
    jobs = [
        wanted(1, "update", "+7999", "a@x.ru", LAST_NAME="Petrova", NAME="Anna"),
        wanted(2, "update", "+7999", "b@x.ru", NAME="Olga"),
    ]

    first, second = decide(jobs, found)

    assert first.fill == {"NAME": "Anna", "EMAIL": [{"VALUE": "a@x.ru", "VALUE_TYPE": "WORK"}]}
    assert second.fill == {"EMAIL": [{"VALUE": "b@x.ru", "VALUE_TYPE": "WORK"}]}  # NAME is Anna now


def test_create_mode_never_looks() -> None:
    [decision] = decide([wanted(1, "create", "+7999")], {5: contact(5, ("+7999",))})
    assert decision.action == "create"
