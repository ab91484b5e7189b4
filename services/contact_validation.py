"""Turn the robot's input properties into `crm.contact.add` fields, or a reason to refuse them.

Phone numbers go through `phonenumbers` (Google's libphonenumber) and e-mail addresses through
`email-validator`: both know far more real-world cases than a regular expression would.
"""

import re
import unicodedata
from typing import Any

import phonenumbers
from email_validator import EmailNotValidError, validate_email

NAME_MAX = 50  # the width of NAME, SECOND_NAME and LAST_NAME in Bitrix24's CRM tables
_SPACES = re.compile(r"\s+")


class InvalidContactData(ValueError):
    """The robot's inputs cannot make a contact; the message is meant for the portal admin."""


def contact_fields(properties: dict[str, Any], default_region: str) -> dict[str, Any]:
    """CRM fields for the contact, or InvalidContactData with the first reason it cannot be made."""
    last, first, middle = (_name(properties, key) for key in ("last_name", "first_name", "second_name"))
    if not last and not first:
        raise InvalidContactData("Neither a last name nor a first name was given; set at least one of them.")
    fields: dict[str, Any] = {"LAST_NAME": last, "NAME": first, "SECOND_NAME": middle}
    phone = _text(properties, "phone")
    if phone:
        fields["PHONE"] = [{"VALUE": normalize_phone(phone, default_region), "VALUE_TYPE": "WORK"}]
    email = _text(properties, "email")
    if email:
        fields["EMAIL"] = [{"VALUE": normalize_email(email), "VALUE_TYPE": "WORK"}]
    return {key: value for key, value in fields.items() if value}


def normalize_phone(raw: str, default_region: str) -> str:
    """The number in E.164 (`+79991234567`); numbers without `+` are read in `default_region`."""
    try:
        number = phonenumbers.parse(raw, default_region)
    except phonenumbers.NumberParseException as exc:
        raise InvalidContactData(f"The phone {_quote(raw)} is not a phone number.") from exc
    if _letters_as_digits(raw, number):
        raise InvalidContactData(f"The phone {_quote(raw)} has letters where digits belong.")
    if not phonenumbers.is_valid_number(number):
        raise InvalidContactData(
            f"The phone {_quote(raw)} is not a valid phone number"
            f" (numbers without a country code are read as {default_region})."
        )
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def _letters_as_digits(raw: str, number: phonenumbers.PhoneNumber) -> bool:
    # libphonenumber reads letters as a phone keypad would ("8 999 CALL NOW" -> +79992255669).
    if not any(char.isalpha() for char in raw):
        return False
    return phonenumbers.national_significant_number(number) not in phonenumbers.normalize_digits_only(raw)


def normalize_email(raw: str) -> str:
    """The address in normalised form; no DNS lookups, so validation never waits on the network."""
    try:
        return validate_email(raw, check_deliverability=False).normalized
    except EmailNotValidError as exc:
        raise InvalidContactData(f"The e-mail {_quote(raw)} is not a valid address: {exc}") from exc


def _name(properties: dict[str, Any], key: str) -> str:
    value = _SPACES.sub(" ", _text(properties, key))
    if any(unicodedata.category(char) in ("Cc", "Cf") for char in value):
        raise InvalidContactData(f"The {key.replace('_', ' ')} contains control characters.")
    if len(value) > NAME_MAX:
        raise InvalidContactData(f"The {key.replace('_', ' ')} is longer than {NAME_MAX} characters.")
    return value


def _text(properties: dict[str, Any], key: str) -> str:
    value = properties.get(key)
    if isinstance(value, list):  # a property set to "multiple" in the designer: take the first
        value = next((item for item in value if isinstance(item, str) and item.strip()), "")
    if value is None or not isinstance(value, str):
        return ""
    return value.strip()


def _quote(raw: str) -> str:
    return f'"{raw[:64]}"'
