"""BitrixClient against what the real portal does (issue #9): the `time` block and the per-method
time limit, `$result[...]` inside `batch`, renamed portals, the regional authorization server and
the error codes with their real meaning. respx stands in for the portal; see test_bitrix_client.
"""

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx

from services.bitrix_client import (
    BitrixAppNotInstalled,
    BitrixAuthError,
    BitrixClient,
    BitrixConfirmationDenied,
    BitrixConfirmationPending,
    BitrixError,
    BitrixInvalidCredentials,
    BitrixMethodLimited,
    BitrixPaymentRequired,
    BitrixScopeMissing,
    BitrixUserInactive,
    BitrixWrongAuthType,
    PortalMoved,
)
from services.method_limits import NEXT_BUCKET_SECONDS, MethodLimits
from services.rate_limit import PortalRateLimiter
from services.retry import RetryPolicy
from tests.test_bitrix_client import (
    MEMBER_ID,
    NEW_ACCESS,
    OLD_ACCESS,
    REST,
    TOKEN_URL,
    Harness,
    _err,
    _expired,
    _form,
    _json,
    _token_reply,
)

pytestmark = pytest.mark.anyio

NEW_REST = "https://b24-renamed.bitrix24.ru/rest/"
LIMITED = _err(429, "OPERATION_TIME_LIMIT", "Method is blocked due to operation time limit.")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def bx(tmp_path: Path) -> AsyncIterator[Harness]:
    router = respx.MockRouter(assert_all_mocked=True)
    async with httpx.AsyncClient(transport=httpx.MockTransport(router.async_handler)) as http:
        yield Harness(tmp_path, router, http)


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def _ok(result: Any, operating: float = 0.5, reset_at: float | None = None) -> httpx.Response:
    block = {"start": 1.0, "finish": 1.1, "operating": operating}
    block["operating_reset_at"] = reset_at if reset_at is not None else time.time() + 600
    return httpx.Response(200, json={"result": result, "time": block})


def _with_limits(bx: Harness, clock: Clock) -> BitrixClient:
    bx.client = BitrixClient(
        bx.client._http,
        bx.store,
        bx.settings,
        PortalRateLimiter(1000, 1000),
        RetryPolicy(rand=lambda: 0.0),
        sleep=bx._sleep,
        limits=MethodLimits(clock),
    )
    return bx.client


def _batch_reply(results: dict[str, Any], errors: dict[str, Any], times: dict[str, Any]) -> httpx.Response:
    body: dict[str, Any] = {
        "result": results or [],
        "result_error": errors or [],
        "result_total": [],
        "result_next": [],
        "result_time": times or [],
    }
    return httpx.Response(200, json={"result": body, "time": {"operating": 0}})


# --- the per-method time limit ---------------------------------------------------------------------


async def test_a_limited_method_is_not_called_again_before_its_reset(bx: Harness) -> None:
    await bx.install()
    reset_at = time.time() + 300
    add = bx.router.post(f"{REST}crm.contact.add").mock(side_effect=[_ok(1, 470.0, reset_at), LIMITED])
    send = bx.router.post(f"{REST}bizproc.event.send").mock(return_value=_ok(True))

    await bx.client.call(MEMBER_ID, "crm.contact.add", {"fields": {}})
    with pytest.raises(BitrixMethodLimited) as first:
        await bx.client.call(MEMBER_ID, "crm.contact.add", {"fields": {}})
    with pytest.raises(BitrixMethodLimited) as second:
        await bx.client.call(MEMBER_ID, "crm.contact.add", {"fields": {}})
    answered = await bx.client.call(MEMBER_ID, "bizproc.event.send", {"event_token": "t"})

    assert add.call_count == 2  # the blocked method was not retried nor called again
    assert first.value.resume_at == reset_at == second.value.resume_at  # the last good reply's reset
    assert first.value.retryable
    assert answered is True  # other methods go on
    assert send.call_count == 1


async def test_after_the_reset_one_probe_goes_and_a_refused_probe_waits_a_bucket(bx: Harness) -> None:
    clock = Clock()
    client = _with_limits(bx, clock)
    await bx.install()
    add = bx.router.post(f"{REST}crm.contact.add").mock(
        side_effect=[_ok(1, 10.0, clock.now + 60), LIMITED, LIMITED, _ok(2)]
    )
    await client.call(MEMBER_ID, "crm.contact.add", {})
    with pytest.raises(BitrixMethodLimited):
        await client.call(MEMBER_ID, "crm.contact.add", {})

    clock.now += 61  # past operating_reset_at: one probe
    with pytest.raises(BitrixMethodLimited) as probe:
        await client.call(MEMBER_ID, "crm.contact.add", {})
    assert add.call_count == 3
    assert probe.value.resume_at == clock.now + NEXT_BUCKET_SECONDS

    with pytest.raises(BitrixMethodLimited):
        await client.call(MEMBER_ID, "crm.contact.add", {})  # still within the next bucket: not sent
    clock.now += NEXT_BUCKET_SECONDS
    assert await client.call(MEMBER_ID, "crm.contact.add", {}) == 2
    assert add.call_count == 4


async def test_in_a_batch_each_command_counts_for_its_own_method(bx: Harness) -> None:
    clock = Clock()
    client = _with_limits(bx, clock)
    await bx.install()
    limited = {"error": "OPERATION_TIME_LIMIT", "error_description": "Method is blocked"}
    batch = bx.router.post(f"{REST}batch").mock(
        side_effect=[
            _batch_reply({"b": True}, {"a": limited}, {"b": {"operating": 0.1}}),
            _batch_reply({"b": True}, {}, {"b": {"operating": 0.2}}),
        ]
    )
    commands: dict[str, tuple[str, dict[str, Any]]] = {
        "a": ("crm.contact.add", {"fields": {}}),
        "b": ("bizproc.event.send", {"event_token": "t"}),
    }

    first = await client.batch(MEMBER_ID, commands)
    second = await client.batch(MEMBER_ID, commands)

    assert isinstance(first.errors["a"], BitrixMethodLimited)
    assert isinstance(second.errors["a"], BitrixMethodLimited)
    assert second.results == {"b": True}
    sent = _json(batch.calls[1].request)["cmd"]
    assert list(sent) == ["b"]  # the blocked method stayed home; the answer went out


async def test_several_refused_commands_of_one_method_keep_its_reset_time(bx: Harness) -> None:
    clock = Clock()
    client = _with_limits(bx, clock)
    await bx.install()
    reset_at = clock.now + 200
    bx.router.post(f"{REST}crm.contact.add").mock(return_value=_ok(1, 5.0, reset_at))
    await client.call(MEMBER_ID, "crm.contact.add", {})
    limited = {"error": "OPERATION_TIME_LIMIT", "error_description": "Method is blocked"}
    bx.router.post(f"{REST}batch").mock(return_value=_batch_reply({}, {"a": limited, "b": limited}, {}))

    outcome = await client.batch(MEMBER_ID, {key: ("crm.contact.add", {}) for key in ("a", "b")})

    assert [error.resume_at for error in outcome.errors.values()] == [reset_at, reset_at]


async def test_a_probe_in_flight_holds_the_rest_of_its_method(bx: Harness) -> None:
    clock = Clock()
    client = _with_limits(bx, clock)
    await bx.install()
    bx.router.post(f"{REST}crm.contact.add").mock(side_effect=[_ok(1, 1.0, clock.now + 30), LIMITED])
    await client.call(MEMBER_ID, "crm.contact.add", {})
    with pytest.raises(BitrixMethodLimited):
        await client.call(MEMBER_ID, "crm.contact.add", {})
    clock.now += 31
    batch = bx.router.post(f"{REST}batch").mock(return_value=_batch_reply({"a": 5}, {}, {"a": {}}))

    outcome = await client.batch(MEMBER_ID, {key: ("crm.contact.add", {}) for key in ("a", "b", "c")})

    assert list(_json(batch.calls[0].request)["cmd"]) == ["a"]  # one probe
    assert outcome.results == {"a": 5}
    assert {k: type(e) for k, e in outcome.errors.items()} == {
        "b": BitrixMethodLimited,
        "c": BitrixMethodLimited,
    }


async def test_a_method_near_its_limit_is_slowed_before_the_portal_blocks_it(bx: Harness) -> None:
    await bx.install()
    bx.router.post(f"{REST}crm.contact.add").mock(return_value=_ok(1, operating=470.0))

    await bx.client.call(MEMBER_ID, "crm.contact.add", {})
    assert bx.sleeps == []
    await bx.client.call(MEMBER_ID, "crm.contact.add", {})

    assert len(bx.sleeps) == 1
    assert bx.sleeps[0] > 0


async def test_when_batch_itself_is_blocked_its_commands_go_one_by_one(bx: Harness) -> None:
    await bx.install()
    bx.router.post(f"{REST}batch").mock(return_value=LIMITED)
    add = bx.router.post(f"{REST}crm.contact.add").mock(return_value=_ok(7))

    outcome = await bx.client.batch(MEMBER_ID, {"a": ("crm.contact.add", {"fields": {"NAME": "Ivan"}})})

    assert outcome.results == {"a": 7}
    assert _json(add.calls[0].request)["fields"] == {"NAME": "Ivan"}


# --- $result[...] in user text -------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["$result[x]", "$ERROR[a][error]", "Ivan $time[b][date_start]", "$next[a]", "o$Total[a]k", "$resultX[y]"],
)
async def test_a_value_batch_would_rewrite_is_sent_on_its_own(bx: Harness, name: str) -> None:
    await bx.install()
    batch = bx.router.post(f"{REST}batch").mock(return_value=_batch_reply({"b": 2}, {}, {}))
    add = bx.router.post(f"{REST}crm.contact.add").mock(return_value=_ok(1))
    commands = {
        "a": ("crm.contact.add", {"fields": {"NAME": name}}),
        "b": ("crm.contact.add", {"fields": {"NAME": "Ivan"}}),
    }

    outcome = await bx.client.batch(MEMBER_ID, commands)

    assert outcome.results == {"a": 1, "b": 2}
    assert _json(add.calls[0].request)["fields"]["NAME"] == name  # exactly, outside batch
    assert list(_json(batch.calls[0].request)["cmd"]) == ["b"]


@pytest.mark.parametrize("text", ["$100 [discount]", "$result", "$results without a key", "price: $ 5 [net]"])
async def test_ordinary_dollar_text_stays_in_the_batch(bx: Harness, text: str) -> None:
    await bx.install()
    batch = bx.router.post(f"{REST}batch").mock(return_value=_batch_reply({"a": 1}, {}, {}))

    outcome = await bx.client.batch(MEMBER_ID, {"a": ("bizproc.event.send", {"log_message": text})})

    assert outcome.results == {"a": 1}
    assert batch.call_count == 1


# --- renamed portals -----------------------------------------------------------------------------


async def test_a_302_is_followed_as_a_post_with_its_body_and_the_address_stored(bx: Harness) -> None:
    await bx.install()
    old = bx.router.post(f"{REST}crm.contact.add").mock(
        return_value=httpx.Response(302, headers={"Location": f"{NEW_REST}crm.contact.add"})
    )
    new = bx.router.post(f"{NEW_REST}crm.contact.add").mock(return_value=_ok(9))

    assert await bx.client.call(MEMBER_ID, "crm.contact.add", {"fields": {"NAME": "Ivan"}}) == 9

    assert new.calls[0].request.method == "POST"
    assert _json(new.calls[0].request) == _json(old.calls[0].request)
    assert bx.stored()["client_endpoint"] == NEW_REST
    assert bx.stored()["domain"] == "b24-renamed.bitrix24.ru"
    assert bx.stored()["renamed_from"] == "example.bitrix24.ru"


async def test_a_pinned_address_refuses_the_move_and_names_the_setting(bx: Harness) -> None:
    bx.settings = bx.settings.model_copy(update={"bitrix_portal_url": "https://example.bitrix24.ru"})
    bx.client._settings = bx.settings
    await bx.install()
    bx.router.post(f"{REST}crm.contact.add").mock(
        return_value=httpx.Response(302, headers={"Location": f"{NEW_REST}crm.contact.add"})
    )
    new = bx.router.post(f"{NEW_REST}crm.contact.add").mock(return_value=_ok(9))

    with pytest.raises(PortalMoved) as caught:
        await bx.client.call(MEMBER_ID, "crm.contact.add", {})

    assert "set BITRIX_PORTAL_URL=https://b24-renamed.bitrix24.ru" in str(caught.value)
    assert caught.value.resume_at is not None  # jobs wait for the administrator, they are not lost
    assert new.call_count == 0  # the token never went to the new host
    assert bx.stored()["client_endpoint"] == REST
    assert bx.stored()["moved_to"] == NEW_REST


@pytest.mark.parametrize(
    "location", ["https://evil.example/rest/crm.contact.add", "http://b24-renamed.bitrix24.ru/rest/x"]
)
async def test_a_redirect_to_a_host_that_is_no_cloud_portal_is_not_followed(
    bx: Harness, location: str
) -> None:
    await bx.install()
    bx.router.post(f"{REST}crm.contact.add").mock(
        return_value=httpx.Response(302, headers={"Location": location})
    )

    with pytest.raises(PortalMoved):
        await bx.client.call(MEMBER_ID, "crm.contact.add", {})

    assert len(bx.router.calls) == 1
    assert bx.stored()["client_endpoint"] == REST


async def test_a_refresh_reply_moves_the_portal_to_its_current_address(bx: Harness) -> None:
    await bx.install()
    bx.router.post(f"{REST}crm.contact.add").mock(return_value=_expired())
    reply = json.loads(_token_reply().content)
    bx.router.post(TOKEN_URL).mock(
        return_value=httpx.Response(200, json={**reply, "client_endpoint": NEW_REST})
    )
    new = bx.router.post(f"{NEW_REST}crm.contact.add").mock(return_value=_ok(3))

    assert await bx.client.call(MEMBER_ID, "crm.contact.add", {}) == 3

    assert _json(new.calls[0].request)["auth"] == NEW_ACCESS
    assert bx.stored()["client_endpoint"] == NEW_REST


# --- the authorization server of the portal's region -------------------------------------------


@pytest.mark.parametrize(
    ("server_endpoint", "token_url"),
    [
        ("https://oauth.bitrix24.tech/rest/", "https://oauth.bitrix24.tech/oauth/token/"),
        ("https://oauth.bitrix.info/rest/", "https://oauth.bitrix.info/oauth/token/"),
        ("https://oauth.test/rest/", TOKEN_URL),  # BITRIX_OAUTH_URL
        (None, TOKEN_URL),
        ("https://evil.example/rest/", TOKEN_URL),
        ("https://oauth.bitrix24.tech.evil.example/rest/", TOKEN_URL),
        ("https://oauth.bitrix24.tech@evil.example/rest/", TOKEN_URL),
        ("http://oauth.bitrix24.tech:8080/rest/", TOKEN_URL),
    ],
)
async def test_tokens_are_refreshed_at_the_portals_server_and_nowhere_else(
    bx: Harness, server_endpoint: str | None, token_url: str
) -> None:
    await bx.install(expires_in=0, server_endpoint=server_endpoint)
    token = bx.router.post(token_url).mock(return_value=_token_reply())
    bx.router.post(f"{REST}app.info").mock(return_value=_ok({}))

    await bx.client.call(MEMBER_ID, "app.info")

    assert token.call_count == 1
    assert len([c for c in bx.router.calls if "/oauth/token/" in str(c.request.url)]) == 1


@pytest.mark.parametrize(
    ("server_domain", "token_url"),
    [
        ("oauth.bitrix24.tech", "https://oauth.bitrix24.tech/oauth/token/"),
        ("oauth.bitrix.info", "https://oauth.bitrix.info/oauth/token/"),
        ("evil.example", TOKEN_URL),
        (None, TOKEN_URL),
    ],
)
async def test_codes_are_exchanged_at_the_server_the_redirect_names_if_allowed(
    bx: Harness, server_domain: str | None, token_url: str
) -> None:
    token = bx.router.post(token_url).mock(return_value=_token_reply())

    await bx.client.exchange_code("code-1", server_domain)

    assert _form(token.calls[0].request)["code"] == "code-1"
    assert len(bx.router.calls) == 1


# --- error codes with their real meaning ----------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code", "description", "expected", "retried"),
    [
        (
            403,
            "WRONG_AUTH_TYPE",
            "Current authorization type is denied for this method",
            BitrixWrongAuthType,
            False,
        ),
        (403, "INVALID_CREDENTIALS", "Invalid request credentials", BitrixInvalidCredentials, False),
        (401, "authorization_error", "Unable to authorize user", BitrixUserInactive, False),
        (401, "ERROR_OAUTH", "Application not installed", BitrixAppNotInstalled, False),
        (401, "APPLICATION_NOT_FOUND", "Application not found", BitrixAppNotInstalled, False),
        (401, "METHOD_CONFIRM_WAITING", "Waiting for confirmation", BitrixConfirmationPending, True),
        (403, "METHOD_CONFIRM_DENIED", "Method call denied", BitrixConfirmationDenied, False),
        (402, "PAYMENT_REQUIRED", "Payment required", BitrixPaymentRequired, False),
        (403, "insufficient_scope", "The request requires higher privileges", BitrixScopeMissing, False),
        (403, "ACCESS_DENIED", "REST API is available only on commercial plans", BitrixScopeMissing, False),
    ],
)
async def test_each_error_code_has_its_class_hint_and_retry_rule(
    bx: Harness, status: int, code: str, description: str, expected: type[BitrixError], retried: bool
) -> None:
    await bx.install()
    route = bx.router.post(f"{REST}crm.contact.add").mock(return_value=_err(status, code, description))
    token = bx.router.post(TOKEN_URL).mock(return_value=_token_reply())

    with pytest.raises(BitrixError) as caught:
        await bx.client.call(MEMBER_ID, "crm.contact.add", {})

    assert type(caught.value) is expected
    assert caught.value.retryable is retried
    assert route.call_count == (3 if retried else 1)  # the in-request policy: three tries
    assert token.call_count == 0  # none of them is a reason to refresh or re-authorize
    assert "/oauth/login" not in caught.value.admin_hint
    assert caught.value.admin_hint != BitrixError.admin_hint


@pytest.mark.parametrize("code", ["WRONG_AUTH_TYPE", "INVALID_CREDENTIALS"])
async def test_wrong_auth_type_and_invalid_credentials_are_no_auth_errors(bx: Harness, code: str) -> None:
    await bx.install()
    bx.router.post(f"{REST}app.info").mock(return_value=_err(401, code, ""))

    with pytest.raises(BitrixError) as caught:
        await bx.client.call_with_token(REST, OLD_ACCESS, "app.info")

    assert not isinstance(caught.value, BitrixAuthError)
