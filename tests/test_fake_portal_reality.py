"""The fake portal's issue-#9 behaviours, each as its source describes the real portal."""

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import eventually
from tests.fake_portal import PORTAL_ERRORS, FakePortal, FakePortalConfig, _substitute

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def limited() -> Iterator[FakePortal]:
    config = FakePortalConfig(
        rate_burst=None, operating_limit=1.0, operating_window=2.0, operating_costs={"crm.contact.add": 1.5}
    )
    with FakePortal(config) as running:
        yield running


def _rest(portal: FakePortal, method: str, token: str, **params: Any) -> httpx.Response:
    return httpx.post(f"{portal.url}/rest/{method}", json={**params, "auth": token})


def _token(portal: FakePortal) -> str:
    return portal._state.issue_tokens(1).access_token


async def test_every_reply_has_the_time_block_and_a_spent_method_is_blocked_until_reset(
    limited: FakePortal,
) -> None:
    token = _token(limited)
    first = _rest(limited, "crm.contact.add", token, fields={"NAME": "A"}).json()
    assert first["time"]["operating"] == 1.5
    assert first["time"]["operating_reset_at"] >= first["time"]["start"]

    blocked = _rest(limited, "crm.contact.add", token, fields={"NAME": "B"})
    other = _rest(limited, "app.info", token)

    assert blocked.status_code == 429
    assert blocked.json()["error"] == "OPERATION_TIME_LIMIT"
    assert other.status_code == 200  # other methods keep working
    again = lambda: _rest(limited, "crm.contact.add", token, fields={"NAME": "C"}).status_code == 200  # noqa: E731
    await eventually(again, timeout=10, what="the method after its reset")


def test_inside_batch_each_command_counts_for_its_method(limited: FakePortal) -> None:
    token = _token(limited)
    cmd = {"a": "crm.contact.add?fields[NAME]=A", "b": "crm.contact.add?fields[NAME]=B", "c": "app.info"}
    reply = _rest(limited, "batch", token, halt=0, cmd=cmd).json()

    assert reply["result"]["result_time"]["a"]["operating"] == 1.5
    assert reply["result"]["result_error"]["b"]["error"] == "OPERATION_TIME_LIMIT"
    assert "c" in reply["result"]["result"]
    assert reply["time"]["operating"] == 0  # the outer batch is not counted (limits.md)


REFS = {
    "result": {"a": {"ID": "7", "NAME": "Ivan"}, "b": 5},
    "error": {"e": {"error": "ERR", "error_description": "bad"}},
    "time": {"a": {"date_start": "2026-11-28T10:00:00+03:00"}},
    "next": {},
    "total": {"a": 3},
}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("$result[a][NAME]", "Ivan"),
        ("$RESULT[a][NAME]", None),  # the name is matched in any case, the array looked up as typed
        ("$result[x]", REFS["result"]),  # a missing key stops the walk: the whole array
        ("$result[b]", 5),
        ("Mr $result[a][NAME] Smith", "Mr Ivan Smith"),
        ("Mr $result[a][NAME]! Smith", "Mr Ivan Smith"),  # the path runs to the next space
        ("Mr $result[b] Smith", "Mr $result[b] Smith"),  # inside text only strings are put in
        ("at $time[a][date_start]", "at 2026-11-28T10:00:00+03:00"),
        ("$error[e][error_description]", "bad"),
        ("$total[a]", 3),
        ("$result", "$result"),  # no [key]: left alone
        ("$100 [net]", "$100 [net]"),
    ],
)
def test_batch_substitution_is_the_cores(value: str, expected: Any) -> None:
    assert _substitute({"fields": {"NAME": value}}, REFS) == {"fields": {"NAME": expected}}


def test_a_renamed_portal_redirects_from_its_old_host(limited: FakePortal) -> None:
    token = _token(limited)
    old_host = limited.domain
    limited.rename("https://b24-new.bitrix24.ru")

    reply = httpx.post(
        f"{limited.bound_url}/rest/app.info?x=1", json={"auth": token}, headers={"Host": old_host}
    )
    refreshed = limited._state.token_response(limited._state.issue_tokens(1))

    assert reply.status_code == 302
    assert reply.headers["location"] == "https://b24-new.bitrix24.ru/rest/app.info?x=1"
    assert refreshed["client_endpoint"] == "https://b24-new.bitrix24.ru/rest/"


def test_the_regional_oauth_server_alone_issues_tokens() -> None:
    config = FakePortalConfig(public_url="https://b24-x.bitrix24.ru", oauth_url="https://oauth.bitrix24.tech")
    with FakePortal(config) as portal:
        form = {
            "grant_type": "refresh_token",
            "client_id": config.client_id,
            "client_secret": config.client_secret,
        }
        pair = portal._state.issue_tokens(1)
        elsewhere = httpx.post(
            f"{portal.bound_url}/oauth/token/", data={**form, "refresh_token": pair.refresh_token},
            headers={"Host": "b24-x.bitrix24.ru"},
        )  # fmt: skip
        there = httpx.post(
            f"{portal.bound_url}/oauth/token/", data={**form, "refresh_token": pair.refresh_token},
            headers={"Host": "oauth.bitrix24.tech"},
        )  # fmt: skip

        assert elsewhere.status_code == 404
        assert there.status_code == 200
        assert there.json()["server_endpoint"] == "https://oauth.bitrix24.tech/rest/"
        assert "server_endpoint%5D=https%3A%2F%2Foauth.bitrix24.tech%2Frest%2F" in portal.install_event_body()


@pytest.mark.parametrize("code", sorted(PORTAL_ERRORS))
def test_documented_error_replies(limited: FakePortal, code: str) -> None:
    limited.fail_with("app.info", code)

    reply = _rest(limited, "app.info", _token(limited))

    assert (reply.status_code, reply.json()["error"]) == (PORTAL_ERRORS[code][0], code)
