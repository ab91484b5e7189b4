"""Callbacks from a renamed portal: same member_id and application_token, a new address."""

import pytest

from services.errors import ForeignPortal, InvalidApplicationToken
from services.trust import verify_callback
from tests.test_trust import OPEN, PINNED, auth, stored

NEW = {"domain": "b24-new.bitrix24.ru", "client_endpoint": "https://b24-new.bitrix24.ru/rest/"}


def test_an_authentic_call_from_the_portals_new_address_is_accepted() -> None:
    record = verify_callback(OPEN, stored(), auth(**NEW))

    assert record.client_endpoint == "https://example.bitrix24.ru/rest/"  # requests still go where stored


def test_a_new_address_without_the_application_token_is_still_refused() -> None:
    with pytest.raises(InvalidApplicationToken):
        verify_callback(OPEN, stored(), auth(**NEW, application_token="0" * 32))


@pytest.mark.parametrize(
    "changes",
    [
        {"domain": "evil.example.com", "client_endpoint": "https://evil.example.com/rest/"},
        {"domain": "b24-new.bitrix24.ru", "client_endpoint": "https://evil.bitrix24.ru/rest/"},
        {"domain": "b24-new.bitrix24.ru", "client_endpoint": "http://b24-new.bitrix24.ru/rest/"},
    ],
)
def test_a_new_address_the_app_would_not_install_from_is_refused(changes: dict[str, str]) -> None:
    with pytest.raises(ForeignPortal):
        verify_callback(OPEN, stored(), auth(**changes))


def test_a_pinned_portal_refuses_its_new_address_and_logs_the_setting(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with pytest.raises(ForeignPortal):
        verify_callback(PINNED, stored(), auth(**NEW))

    assert "set BITRIX_PORTAL_URL=https://b24-new.bitrix24.ru and restart" in caplog.text
