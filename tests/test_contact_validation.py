"""contact_fields: robot properties in, `crm.contact.add` fields or a reason for the admin out."""

from typing import Any

import pytest

from services.contact_validation import NAME_MAX, InvalidContactData, contact_fields


def _fields(**properties: Any) -> dict[str, Any]:
    return contact_fields(properties, "RU")


def test_full_contact_maps_every_property() -> None:
    fields = _fields(
        last_name="Ivanov",
        first_name="Ivan",
        second_name="Ivanovich",
        phone="+79991234567",
        email="ivan@example.com",
    )

    assert fields == {
        "LAST_NAME": "Ivanov",
        "NAME": "Ivan",
        "SECOND_NAME": "Ivanovich",
        "PHONE": [{"VALUE": "+79991234567", "VALUE_TYPE": "WORK"}],
        "EMAIL": [{"VALUE": "ivan@example.com", "VALUE_TYPE": "WORK"}],
    }


def test_names_are_trimmed_and_inner_whitespace_collapsed() -> None:
    fields = _fields(last_name="  Ivanov \t", first_name="Anna\n  Maria ")

    assert fields == {"LAST_NAME": "Ivanov", "NAME": "Anna Maria"}


def test_empty_properties_are_left_out() -> None:
    assert _fields(last_name="Ivanov", first_name="", second_name="   ", phone="", email=" ") == {
        "LAST_NAME": "Ivanov"
    }


@pytest.mark.parametrize(
    "properties", [{}, {"last_name": " ", "first_name": ""}, {"second_name": "Ivanovich"}]
)
def test_a_last_or_first_name_is_required(properties: dict[str, Any]) -> None:
    with pytest.raises(InvalidContactData, match="last name nor a first name"):
        contact_fields({**properties, "phone": "+79991234567"}, "RU")


def test_a_first_name_alone_is_enough() -> None:
    assert _fields(first_name="Ivan") == {"NAME": "Ivan"}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("8 (999) 123-45-67", "+79991234567"),
        ("+7 999 1234567", "+79991234567"),
        ("89991234567", "+79991234567"),
        ("+49 30 12345678", "+493012345678"),
        ("+7 999 123-45-67 доб. 12", "+79991234567"),
    ],
)
def test_phones_are_normalised_to_e164(raw: str, expected: str) -> None:
    assert _fields(last_name="Ivanov", phone=raw)["PHONE"] == [{"VALUE": expected, "VALUE_TYPE": "WORK"}]


def test_numbers_without_country_code_are_read_in_the_default_region() -> None:
    fields = contact_fields({"last_name": "Müller", "phone": "030 12345678"}, "DE")

    assert fields["PHONE"][0]["VALUE"] == "+493012345678"


@pytest.mark.parametrize("raw", ["not a phone", "+7 999 123 ABCD", "8 999 CALL NOW", "8-800-FLOWERS"])
def test_phones_with_letters_are_rejected(raw: str) -> None:
    with pytest.raises(InvalidContactData, match="phone"):
        _fields(last_name="Ivanov", phone=raw)


@pytest.mark.parametrize("raw", ["123", "8 999 12", "+7 999 123 45"])
def test_too_short_phones_are_rejected(raw: str) -> None:
    with pytest.raises(InvalidContactData, match="not a valid phone number"):
        _fields(last_name="Ivanov", phone=raw)


def test_rejected_phone_message_quotes_the_input_for_the_admin() -> None:
    with pytest.raises(InvalidContactData) as caught:
        _fields(last_name="Ivanov", phone="12")

    assert '"12"' in str(caught.value)
    assert "RU" in str(caught.value)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("ivan@example.com", "ivan@example.com"),
        ("  Ivan@Example.COM ", "Ivan@example.com"),
        ("иван@пример.рф", "иван@пример.рф"),
    ],
)
def test_emails_are_trimmed_and_normalised(raw: str, expected: str) -> None:
    assert _fields(last_name="Ivanov", email=raw)["EMAIL"] == [{"VALUE": expected, "VALUE_TYPE": "WORK"}]


@pytest.mark.parametrize(
    "raw", ["ivan", "ivan@", "@example.com", "ivan@@example.com", "ivan@example", "a b@c.ru"]
)
def test_invalid_emails_are_rejected(raw: str) -> None:
    with pytest.raises(InvalidContactData, match="e-mail"):
        _fields(last_name="Ivanov", email=raw)


@pytest.mark.parametrize("key", ["last_name", "first_name", "second_name"])
def test_over_long_names_are_rejected(key: str) -> None:
    with pytest.raises(InvalidContactData, match=f"longer than {NAME_MAX}"):
        _fields(**{"last_name": "Ivanov", key: "x" * (NAME_MAX + 1)})


def test_a_name_of_exactly_the_limit_is_accepted() -> None:
    assert _fields(last_name="x" * NAME_MAX)["LAST_NAME"] == "x" * NAME_MAX


def test_names_with_control_characters_are_rejected() -> None:
    with pytest.raises(InvalidContactData, match="control characters"):
        _fields(last_name="Iva\x00nov")


def test_multiple_values_take_the_first_non_empty_one() -> None:
    fields = _fields(
        last_name=["", "  Ivanov "],
        phone=["   ", "8 (999) 123-45-67", "+79990000000"],
        email=["ivan@example.com", "other@example.com"],
    )

    assert fields == {
        "LAST_NAME": "Ivanov",
        "PHONE": [{"VALUE": "+79991234567", "VALUE_TYPE": "WORK"}],
        "EMAIL": [{"VALUE": "ivan@example.com", "VALUE_TYPE": "WORK"}],
    }


def test_values_that_are_not_text_are_ignored() -> None:
    assert _fields(last_name="Ivanov", first_name={"nested": "x"}, phone=None) == {"LAST_NAME": "Ivanov"}
