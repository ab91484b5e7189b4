"""Which portals may install the app, and which callbacks count as theirs."""

import pytest

from config import Settings
from schemas import EventAuth, PortalTokens
from services.errors import ForeignPortal, InvalidApplicationToken, UnknownPortal
from services.trust import allowed_portal, verify_callback

OPEN = Settings(_env_file=None)  # type: ignore[call-arg]
PINNED = Settings(_env_file=None, bitrix_portal_url="https://example.bitrix24.ru")  # type: ignore[call-arg]
TOKEN = "51856fefc120afa4b628cc82d3935cce"


@pytest.mark.parametrize(
    ("settings", "domain", "endpoint"),
    [
        (OPEN, "example.bitrix24.ru", "https://example.bitrix24.ru/rest/"),
        (OPEN, "Some-Portal.Bitrix24.com", "https://some-portal.bitrix24.com/rest"),
        (OPEN, "firma.bitrix24.de", "https://firma.bitrix24.de/rest/"),
        (PINNED, "example.bitrix24.ru", "https://example.bitrix24.ru/rest/"),
    ],
)
def test_allowed_portals(settings: Settings, domain: str, endpoint: str) -> None:
    assert allowed_portal(settings, domain, endpoint) == endpoint.lower().rstrip("/") + "/"


@pytest.mark.parametrize(
    ("settings", "domain", "endpoint"),
    [
        (OPEN, "example.bitrix24.ru", "http://example.bitrix24.ru/rest/"),  # no https
        (OPEN, "evil.example.com", "https://evil.example.com/rest/"),  # not a cloud portal
        (OPEN, "example.bitrix24.ru.evil.com", "https://example.bitrix24.ru.evil.com/rest/"),
        (OPEN, "example.bitrix24.ru:8443", "https://example.bitrix24.ru:8443/rest/"),
        (OPEN, "example.bitrix24.ru", "https://evil.bitrix24.ru/rest/"),  # endpoint on another host
        (PINNED, "other.bitrix24.ru", "https://other.bitrix24.ru/rest/"),  # not the configured one
        (PINNED, "example.bitrix24.ru", "http://example.bitrix24.ru/rest/"),  # configured scheme is https
    ],
)
def test_refused_portals(settings: Settings, domain: str, endpoint: str) -> None:
    with pytest.raises(ForeignPortal):
        allowed_portal(settings, domain, endpoint)


def stored() -> PortalTokens:
    return PortalTokens(
        member_id="a" * 32,
        domain="example.bitrix24.ru",
        client_endpoint="https://example.bitrix24.ru/rest/",
        application_token=TOKEN,
    )


def auth(**changes: str) -> EventAuth:
    values = {
        "domain": "example.bitrix24.ru",
        "client_endpoint": "https://example.bitrix24.ru/rest/",
        "member_id": "a" * 32,
        "application_token": TOKEN,
    }
    return EventAuth.model_validate({**values, **changes})


def test_authentic_callback_is_accepted() -> None:
    assert verify_callback(PINNED, stored(), auth()).member_id == "a" * 32


def test_callback_from_an_unknown_portal_is_401() -> None:
    with pytest.raises(UnknownPortal):
        verify_callback(PINNED, None, auth())


@pytest.mark.parametrize("token", ["0" * 32, TOKEN[:-1], TOKEN + "0", TOKEN.upper()])
def test_callback_with_another_application_token_is_403(token: str) -> None:
    with pytest.raises(InvalidApplicationToken):
        verify_callback(PINNED, stored(), auth(application_token=token))


def test_stored_portal_without_application_token_accepts_nothing() -> None:
    record = stored().model_copy(update={"application_token": None})

    with pytest.raises(InvalidApplicationToken):
        verify_callback(PINNED, record, auth())


@pytest.mark.parametrize(
    "changes",
    [{"domain": "evil.bitrix24.ru"}, {"client_endpoint": "https://evil.bitrix24.ru/rest/"}],
)
def test_callback_naming_another_portal_is_403(changes: dict[str, str]) -> None:
    with pytest.raises(ForeignPortal):
        verify_callback(PINNED, stored(), auth(**changes))
