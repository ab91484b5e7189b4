"""Turn the robot's input properties into `crm.contact.add` fields, or a reason to refuse them.

Phone numbers go through `phonenumbers` (Google's libphonenumber) and e-mail addresses through
`email-validator`: both know far more real-world cases than a regular expression would.
"""

import re
import unicodedata
from typing import Any

import phonenumbers
from email_validator import EmailNotValidError, validate_email

from services.messages import Lang, text

NAME_MAX = 50  # the width of NAME, SECOND_NAME and LAST_NAME in Bitrix24's CRM tables
_SPACES = re.compile(r"\s+")


class InvalidContactData(ValueError):
    """The robot's inputs cannot make a contact; the message is meant for the portal admin.

    `str()` is the English text; `message(lang)` the text in the portal's language.
    """

    def __init__(self, key: str, **params: object) -> None:
        self.key, self.params = key, params
        super().__init__(self.message("en"))

    def message(self, lang: Lang) -> str:
        params = dict(self.params)
        if "field" in params:
            params["field"] = text(lang, str(params["field"]))
        return text(lang, self.key, **params)


def contact_fields(properties: dict[str, Any], default_region: str) -> dict[str, Any]:
    """CRM fields for the contact, or InvalidContactData with the first reason it cannot be made."""
    last, first, middle = (_name(properties, key) for key in ("last_name", "first_name", "second_name"))
    if not last and not first:
        raise InvalidContactData("no_name")
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
        raise InvalidContactData("phone_unparseable", raw=_quote(raw)) from exc
    if _letters_as_digits(raw, number):
        raise InvalidContactData("phone_letters", raw=_quote(raw))
    if not phonenumbers.is_valid_number(number):
        raise InvalidContactData("phone_invalid", raw=_quote(raw), region=default_region)
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
        raise InvalidContactData("email_invalid", raw=_quote(raw), reason=exc) from exc


def _name(properties: dict[str, Any], key: str) -> str:
    value = _SPACES.sub(" ", _text(properties, key))
    if any(unicodedata.category(char) in ("Cc", "Cf") for char in value):
        raise InvalidContactData("name_control", field=key)
    if len(value) > NAME_MAX:
        raise InvalidContactData("name_too_long", field=key, limit=NAME_MAX)
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
