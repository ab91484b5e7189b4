"""BitrixClient against a respx router: error mapping, retries, token refresh, batch, code exchange.

The client is built by constructor injection on `httpx.MockTransport(router.async_handler)`, with a
real `JsonTokenStore` in `tmp_path`, a retry policy without jitter and a `sleep` that only records.
"""

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest
import respx
from pydantic import SecretStr

from config import Settings
from repositories.token_store import JsonTokenStore
from schemas import PortalTokens, parse_php_form
from services.bitrix_client import (
    BitrixAccessDenied,
    BitrixApiError,
    BitrixAuthError,
    BitrixClient,
    BitrixError,
    BitrixMethodLimited,
    BitrixRateLimitError,
    BitrixScopeMissing,
    BitrixServerError,
    BitrixTokenExpired,
    BitrixTransportError,
    OAuthError,
    OAuthInvalidClient,
    OAuthInvalidGrant,
    OAuthPaymentRequired,
    PortalNotConnected,
    php_query,
)
from services.rate_limit import PortalRateLimiter
from services.retry import RetryPolicy

MEMBER_ID = "a223c6b3710f85df22e9377d6c4f7553"
DOMAIN = "example.bitrix24.ru"
REST = f"https://{DOMAIN}/rest/"
TOKEN_URL = "https://oauth.test/oauth/token/"
CLIENT_ID = "local.5c8bb1b0891cf2.87252039"
CLIENT_SECRET = "LJSl0lNB76B5YY6u0YVQ3AW0DrVADcRTwVr4y99PXU1BWQybWK"
OLD_ACCESS, OLD_REFRESH = "access-old-s6p6eclrvim6da22", "refresh-old-4s386p3q0tr8dy89"
NEW_ACCESS, NEW_REFRESH = "access-new-ydtj8pho532wydb5", "refresh-new-3s6lr4kr3cv2od4v"


class Harness:
    """The client under test and what it touched."""

    def __init__(self, tmp_path: Path, router: respx.MockRouter, http: httpx.AsyncClient) -> None:
        self.path = tmp_path / "tokens.json"
        self.router = router
        self.store = JsonTokenStore(self.path)
        self.sleeps: list[float] = []
        self.settings = Settings(  # type: ignore[call-arg]
            _env_file=None,
            bitrix_client_id=CLIENT_ID,
            bitrix_client_secret=SecretStr(CLIENT_SECRET),
            bitrix_oauth_url="https://oauth.test",
            token_file=self.path,
            token_refresh_margin_seconds=60,
        )
        self.client = BitrixClient(
            http,
            self.store,
            self.settings,
            PortalRateLimiter(1000, 1000),
            RetryPolicy(rand=lambda: 0.0),
            sleep=self._sleep,
        )

    async def _sleep(self, delay: float) -> None:
        self.sleeps.append(delay)

    async def install(self, *, expires_in: float = 3600, **changes: Any) -> PortalTokens:
        record = PortalTokens(
            member_id=MEMBER_ID,
            domain=DOMAIN,
            client_endpoint=REST,
            access_token=OLD_ACCESS,
            refresh_token=OLD_REFRESH,
            expires_at=time.time() + expires_in,
            application_token="51856fefc120afa4b628cc82d3935cce",
        ).model_copy(update=changes)
        await self.store.save(record)
        return record

    def stored(self) -> dict[str, Any]:
        """The portal's record as it is on disk right now."""
        portal: dict[str, Any] = json.loads(self.path.read_text(encoding="utf-8"))["portals"][MEMBER_ID]
        return portal


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def bx(tmp_path: Path) -> AsyncIterator[Harness]:
    router = respx.MockRouter(assert_all_mocked=True)
    async with httpx.AsyncClient(transport=httpx.MockTransport(router.async_handler)) as http:
        yield Harness(tmp_path, router, http)


def _ok(result: Any) -> httpx.Response:
    return httpx.Response(200, json={"result": result, "time": {"start": 1.0, "finish": 1.1}})


def _err(status: int, error: str, description: str = "", **headers: str) -> httpx.Response:
    return httpx.Response(status, json={"error": error, "error_description": description}, headers=headers)


def _expired() -> httpx.Response:
    return _err(401, "expired_token", "The access token provided has expired")


def _token_reply(*, refresh: str | None = NEW_REFRESH, access: str = NEW_ACCESS) -> httpx.Response:
    body: dict[str, Any] = {
        "access_token": access,
        "expires": int(time.time()) + 3600,
        "expires_in": 3600,
        "scope": "crm,bizproc",
        "domain": "oauth.bitrix.info",
        "server_endpoint": "https://oauth.bitrix.info/rest/",
        "status": "L",
        "client_endpoint": REST,
        "member_id": MEMBER_ID,
        "user_id": 1,
    }
    if refresh is not None:
        body["refresh_token"] = refresh
    return httpx.Response(200, json=body)


def _json(request: httpx.Request) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(request.content)
    return body


def _form(request: httpx.Request) -> dict[str, str]:
    return {key: values[0] for key, values in parse_qs(request.content.decode()).items()}


# --- error envelopes -------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (_err(400, "", "Parameter 'fields' must be array."), BitrixApiError),
        (_err(200, "ERROR_CORE", "The field Work e-mail contains an invalid address"), BitrixApiError),
        (_err(403, "insufficient_scope", "The request requires higher privileges"), BitrixScopeMissing),
        (_err(400, "ERROR_METHOD_NOT_FOUND", "Method not found!"), BitrixApiError),
        (_expired(), BitrixTokenExpired),
        (_err(401, "NO_AUTH_FOUND", "Wrong authorization data"), BitrixAuthError),
        (_err(401, "invalid_token", "Token expired or invalid"), BitrixAuthError),
        (_err(401, "", ""), BitrixAuthError),
        (_err(503, "QUERY_LIMIT_EXCEEDED", "Too many requests"), BitrixRateLimitError),
        (
            _err(429, "OPERATION_TIME_LIMIT", "Method is blocked due to operation time limit."),
            BitrixMethodLimited,
        ),
        (_err(403, "ACCESS_DENIED", "Access denied!"), BitrixAccessDenied),
        (_err(500, "INTERNAL_SERVER_ERROR", "Internal server error"), BitrixServerError),
        (httpx.Response(502, text="<html><body>502 Bad Gateway</body></html>"), BitrixServerError),
        (httpx.Response(200, json={"time": {}}), BitrixServerError),
    ],
)
async def test_error_envelope_maps_to_its_class(
    bx: Harness, reply: httpx.Response, expected: type[BitrixError]
) -> None:
    bx.router.post(f"{REST}crm.contact.add").mock(return_value=reply)

    with pytest.raises(BitrixError) as caught:
        await bx.client.call_with_token(REST, OLD_ACCESS, "crm.contact.add", {"fields": {}})

    assert type(caught.value) is expected


@pytest.mark.anyio
async def test_error_keeps_status_code_and_description_even_with_an_empty_code(bx: Harness) -> None:
    bx.router.post(f"{REST}crm.contact.add").mock(
        return_value=_err(400, "", "Parameter 'fields' must be array.")
    )

    with pytest.raises(BitrixApiError) as caught:
        await bx.client.call_with_token(REST, OLD_ACCESS, "crm.contact.add")

    assert (caught.value.status_code, caught.value.error) == (400, "")
    assert caught.value.description == "Parameter 'fields' must be array."
    assert caught.value.method == "crm.contact.add"
    assert not caught.value.retryable


# --- what is sent ------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_call_posts_params_and_token_in_the_json_body_never_in_the_url(bx: Harness) -> None:
    await bx.install()
    route = bx.router.post(f"{REST}crm.contact.add").mock(return_value=_ok(46))

    result = await bx.client.call(MEMBER_ID, "crm.contact.add", {"fields": {"NAME": "Ivan"}})

    assert result == 46
    request = route.calls.last.request
    assert request.url == f"{REST}crm.contact.add"
    assert request.url.query == b""
    assert OLD_ACCESS not in str(request.url)
    assert request.headers["content-type"] == "application/json"
    assert _json(request) == {"fields": {"NAME": "Ivan"}, "auth": OLD_ACCESS}


@pytest.mark.anyio
async def test_call_without_stored_tokens_is_not_connected_and_sends_nothing(bx: Harness) -> None:
    with pytest.raises(PortalNotConnected):
        await bx.client.call(MEMBER_ID, "app.info")

    assert bx.router.calls.call_count == 0


# --- retries -----------------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(("failures", "sleeps"), [(0, []), (1, [0.25]), (2, [0.25, 0.5])])
async def test_transient_failures_are_retried_until_success(
    bx: Harness, failures: int, sleeps: list[float]
) -> None:
    await bx.install()
    limited = _err(503, "QUERY_LIMIT_EXCEEDED", "Too many requests")
    route = bx.router.post(f"{REST}crm.contact.add").mock(side_effect=[limited] * failures + [_ok(46)])

    assert await bx.client.call(MEMBER_ID, "crm.contact.add", {"fields": {"NAME": "Ivan"}}) == 46

    assert route.call_count == failures + 1
    assert bx.sleeps == sleeps


@pytest.mark.anyio
async def test_retries_give_up_after_the_budget(bx: Harness) -> None:
    await bx.install()
    route = bx.router.post(f"{REST}crm.contact.add").mock(
        return_value=_err(500, "INTERNAL_SERVER_ERROR", "Internal server error")
    )

    with pytest.raises(BitrixServerError):
        await bx.client.call(MEMBER_ID, "crm.contact.add")

    assert route.call_count == 3
    assert bx.sleeps == [0.25, 0.5]


@pytest.mark.anyio
async def test_retry_after_header_sets_the_wait(bx: Harness) -> None:
    await bx.install()
    route = bx.router.post(f"{REST}crm.contact.add").mock(
        side_effect=[_err(503, "QUERY_LIMIT_EXCEEDED", "Too many requests", **{"Retry-After": "3"}), _ok(7)]
    )

    assert await bx.client.call(MEMBER_ID, "crm.contact.add") == 7

    assert route.call_count == 2
    assert bx.sleeps == [3.0]


@pytest.mark.anyio
@pytest.mark.parametrize(
    "reply",
    [
        _err(400, "", "Parameter 'fields' must be array."),
        _err(403, "ACCESS_DENIED", "Access denied!"),
        _err(401, "NO_AUTH_FOUND", "Wrong authorization data"),
    ],
)
async def test_permanent_errors_are_not_retried(bx: Harness, reply: httpx.Response) -> None:
    await bx.install()
    route = bx.router.post(f"{REST}crm.contact.add").mock(return_value=reply)

    with pytest.raises(BitrixApiError):
        await bx.client.call(MEMBER_ID, "crm.contact.add")

    assert route.call_count == 1
    assert bx.sleeps == []


@pytest.mark.anyio
async def test_connect_error_is_retried(bx: Harness) -> None:
    await bx.install()
    route = bx.router.post(f"{REST}app.info").mock(side_effect=[httpx.ConnectError, _ok({"CODE": CLIENT_ID})])

    assert await bx.client.call(MEMBER_ID, "app.info") == {"CODE": CLIENT_ID}

    assert route.call_count == 2
    assert bx.sleeps == [0.25]


@pytest.mark.anyio
async def test_persistent_connect_error_becomes_transport_error(bx: Harness) -> None:
    await bx.install()
    route = bx.router.post(f"{REST}app.info").mock(side_effect=httpx.ConnectError)

    with pytest.raises(BitrixTransportError) as caught:
        await bx.client.call(MEMBER_ID, "app.info")

    assert isinstance(caught.value.__cause__, httpx.ConnectError)
    assert caught.value.retryable
    assert route.call_count == 3
    assert bx.sleeps == [0.25, 0.5]


# --- token refresh -----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_expired_token_refreshes_once_persists_then_replays_once(bx: Harness) -> None:
    await bx.install()
    token_route = bx.router.post(TOKEN_URL).mock(return_value=_token_reply())
    seen_at_replay: list[dict[str, Any]] = []

    def portal(request: httpx.Request) -> httpx.Response:
        if _json(request)["auth"] == OLD_ACCESS:
            return _expired()
        seen_at_replay.append(bx.stored())
        return _ok(46)

    rest_route = bx.router.post(f"{REST}crm.contact.add").mock(side_effect=portal)

    assert await bx.client.call(MEMBER_ID, "crm.contact.add", {"fields": {"NAME": "Ivan"}}) == 46

    assert token_route.call_count == 1
    assert rest_route.call_count == 2
    assert _json(rest_route.calls.last.request) == {"fields": {"NAME": "Ivan"}, "auth": NEW_ACCESS}
    # The rotated pair was on disk before the replay left.
    assert [(r["access_token"], r["refresh_token"]) for r in seen_at_replay] == [(NEW_ACCESS, NEW_REFRESH)]
    assert bx.sleeps == []


@pytest.mark.anyio
async def test_refresh_sends_credentials_in_the_form_body_not_the_url(bx: Harness) -> None:
    await bx.install()
    token_route = bx.router.post(TOKEN_URL).mock(return_value=_token_reply())
    bx.router.post(f"{REST}app.info").mock(side_effect=[_expired(), _ok(True)])

    await bx.client.call(MEMBER_ID, "app.info")

    request = token_route.calls.last.request
    assert request.method == "POST"
    assert request.url == TOKEN_URL
    assert request.url.query == b""
    assert CLIENT_SECRET not in str(request.url)
    assert OLD_REFRESH not in str(request.url)
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"
    assert _form(request) == {
        "grant_type": "refresh_token",
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "refresh_token": OLD_REFRESH,
    }


@pytest.mark.anyio
async def test_client_secret_goes_to_the_oauth_server_only(bx: Harness) -> None:
    await bx.install()
    bx.router.post(TOKEN_URL).mock(return_value=_token_reply())
    bx.router.post(f"{REST}app.info").mock(side_effect=[_expired(), _ok(True)])

    await bx.client.call(MEMBER_ID, "app.info")

    for call in bx.router.calls:
        if call.request.url.host != "oauth.test":
            assert CLIENT_SECRET.encode() not in call.request.content
            assert CLIENT_SECRET not in str(call.request.url)


@pytest.mark.anyio
async def test_replay_that_is_still_expired_fails_without_a_second_refresh(bx: Harness) -> None:
    await bx.install()
    token_route = bx.router.post(TOKEN_URL).mock(return_value=_token_reply())
    rest_route = bx.router.post(f"{REST}app.info").mock(return_value=_expired())

    with pytest.raises(BitrixTokenExpired):
        await bx.client.call(MEMBER_ID, "app.info")

    assert token_route.call_count == 1
    assert rest_route.call_count == 2


@pytest.mark.anyio
async def test_refresh_reply_without_refresh_token_keeps_the_old_one(bx: Harness) -> None:
    await bx.install()
    bx.router.post(TOKEN_URL).mock(return_value=_token_reply(refresh=None))
    bx.router.post(f"{REST}app.info").mock(side_effect=[_expired(), _ok(True)])

    await bx.client.call(MEMBER_ID, "app.info")

    stored = bx.stored()
    assert (stored["access_token"], stored["refresh_token"]) == (NEW_ACCESS, OLD_REFRESH)
    assert stored["expires_at"] > time.time() + 3000


@pytest.mark.anyio
async def test_token_about_to_expire_is_refreshed_before_the_call(bx: Harness) -> None:
    await bx.install(expires_in=30)  # inside the 60 s margin
    token_route = bx.router.post(TOKEN_URL).mock(return_value=_token_reply())
    rest_route = bx.router.post(f"{REST}app.info").mock(return_value=_ok(True))

    await bx.client.call(MEMBER_ID, "app.info")

    assert token_route.call_count == 1
    assert rest_route.call_count == 1
    assert _json(rest_route.calls.last.request)["auth"] == NEW_ACCESS
    assert bx.stored()["refresh_token"] == NEW_REFRESH


@pytest.mark.anyio
async def test_token_outside_the_margin_is_not_refreshed(bx: Harness) -> None:
    await bx.install(expires_in=120)
    token_route = bx.router.post(TOKEN_URL).mock(return_value=_token_reply())
    bx.router.post(f"{REST}app.info").mock(return_value=_ok(True))

    await bx.client.call(MEMBER_ID, "app.info")

    assert token_route.call_count == 0
    assert bx.stored()["access_token"] == OLD_ACCESS


@pytest.mark.anyio
async def test_concurrent_calls_with_an_expired_token_refresh_once(bx: Harness) -> None:
    await bx.install(expires_in=-10)

    async def slow_token_reply(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.02)  # wide window for a second refresh to sneak in
        return _token_reply()

    token_route = bx.router.post(TOKEN_URL).mock(side_effect=slow_token_reply)
    rest_route = bx.router.post(f"{REST}app.info").mock(return_value=_ok(True))

    results = await asyncio.gather(*(bx.client.call(MEMBER_ID, "app.info") for _ in range(20)))

    assert results == [True] * 20
    assert token_route.call_count == 1
    assert rest_route.call_count == 20
    assert {_json(call.request)["auth"] for call in rest_route.calls} == {NEW_ACCESS}


@pytest.mark.anyio
async def test_concurrent_expired_token_replies_refresh_once(bx: Harness) -> None:
    await bx.install()
    token_route = bx.router.post(TOKEN_URL).mock(return_value=_token_reply())

    def portal(request: httpx.Request) -> httpx.Response:
        return _expired() if _json(request)["auth"] == OLD_ACCESS else _ok(True)

    bx.router.post(f"{REST}app.info").mock(side_effect=portal)

    results = await asyncio.gather(*(bx.client.call(MEMBER_ID, "app.info") for _ in range(20)))

    assert results == [True] * 20
    assert token_route.call_count == 1


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("status", "error", "expected"),
    [
        (400, "invalid_grant", OAuthInvalidGrant),
        (401, "invalid_client", OAuthInvalidClient),
        (401, "wrong_client", OAuthInvalidClient),
        (402, "PAYMENT_REQUIRED", OAuthPaymentRequired),
        (400, "invalid_request", OAuthError),
    ],
)
async def test_refused_refresh_raises_and_leaves_the_store_unchanged(
    bx: Harness, status: int, error: str, expected: type[OAuthError]
) -> None:
    await bx.install(expires_in=-10)
    before = bx.path.read_bytes()
    token_route = bx.router.post(TOKEN_URL).mock(return_value=_err(status, error, "refused"))
    rest_route = bx.router.post(f"{REST}app.info").mock(return_value=_ok(True))

    with pytest.raises(OAuthError) as caught:
        await bx.client.call(MEMBER_ID, "app.info")

    assert type(caught.value) is expected
    assert caught.value.error == error
    assert token_route.call_count == 1
    assert rest_route.call_count == 0
    stored, kept = json.loads(bx.path.read_text()), json.loads(before)
    # invalid_grant is for good: the record says so (tokens unchanged), and nothing is sent again.
    reason = stored["portals"][MEMBER_ID].pop("disconnected_reason")
    kept["portals"][MEMBER_ID].pop("disconnected_reason", None)
    assert stored == kept
    assert (reason is not None) == (error == "invalid_grant")
    with pytest.raises(OAuthError if reason is None else PortalNotConnected):
        await bx.client.call(MEMBER_ID, "app.info")
    assert token_route.call_count == (2 if reason is None else 1)


@pytest.mark.anyio
async def test_unreachable_oauth_server_is_a_transport_error_and_keeps_the_store(bx: Harness) -> None:
    await bx.install(expires_in=-10)
    before = bx.path.read_bytes()
    bx.router.post(TOKEN_URL).mock(side_effect=httpx.ConnectError)

    with pytest.raises(BitrixTransportError):
        await bx.client.call(MEMBER_ID, "app.info")

    assert bx.path.read_bytes() == before


@pytest.mark.anyio
async def test_refresh_logs_no_token_or_secret(bx: Harness, caplog: pytest.LogCaptureFixture) -> None:
    await bx.install()
    bx.router.post(TOKEN_URL).mock(return_value=_token_reply())
    bx.router.post(f"{REST}app.info").mock(side_effect=[_expired(), _ok(True)])

    with caplog.at_level("DEBUG"):
        await bx.client.call(MEMBER_ID, "app.info")

    assert "refreshed" in caplog.text
    for secret in (OLD_ACCESS, OLD_REFRESH, NEW_ACCESS, NEW_REFRESH, CLIENT_SECRET):
        assert secret not in caplog.text


# --- batch -------------------------------------------------------------------------------------------

CONTACT = {
    "fields": {
        "NAME": "Ivan",
        "LAST_NAME": "Ivanov",
        "PHONE": [{"VALUE": "+79991234567", "VALUE_TYPE": "WORK"}],
    },
    "params": {"REGISTER_SONET_EVENT": "N"},
}


@pytest.mark.anyio
async def test_batch_maps_each_command_to_its_result_or_error(bx: Harness) -> None:
    await bx.install()
    route = bx.router.post(f"{REST}batch").mock(
        return_value=_ok(
            {
                "result": {"job1": 46, "find": []},
                "result_error": {
                    "job2": {"error": "", "error_description": "Parameter 'fields' must be array."},
                    "job3": {"error": "QUERY_LIMIT_EXCEEDED", "error_description": "Too many requests"},
                },
                "result_total": [],
                "result_next": [],
                "result_time": [],
            }
        )
    )

    outcome = await bx.client.batch(
        MEMBER_ID,
        {
            "job1": ("crm.contact.add", CONTACT),
            "job2": ("crm.contact.add", {"fields": "nope"}),
            "job3": ("crm.contact.add", CONTACT),
            "find": ("crm.duplicate.findbycomm", {"type": "PHONE", "values": ["+79991234567"]}),
        },
    )

    assert outcome.results == {"job1": 46, "find": []}
    assert set(outcome.errors) == {"job2", "job3"}
    assert type(outcome.errors["job2"]) is BitrixApiError
    assert outcome.errors["job2"].description == "Parameter 'fields' must be array."
    assert outcome.errors["job2"].method == "crm.contact.add"
    assert isinstance(outcome.errors["job3"], BitrixRateLimitError)
    assert outcome.errors["job3"].retryable
    assert route.call_count == 1


@pytest.mark.anyio
async def test_batch_sends_php_encoded_commands_with_halt_off(bx: Harness) -> None:
    await bx.install()
    route = bx.router.post(f"{REST}batch").mock(
        return_value=_ok({"result": {"job1": 46}, "result_error": [], "result_total": [], "result_next": []})
    )

    await bx.client.batch(MEMBER_ID, {"job1": ("crm.contact.add", CONTACT)})

    body = _json(route.calls.last.request)
    assert body["halt"] == 0
    assert body["auth"] == OLD_ACCESS
    method, _, query = body["cmd"]["job1"].partition("?")
    assert method == "crm.contact.add"
    assert "fields%5BPHONE%5D%5B0%5D%5BVALUE%5D=%2B79991234567" in query
    assert parse_php_form(query) == CONTACT


@pytest.mark.anyio
async def test_batch_with_php_empty_arrays_has_neither_results_nor_errors_missing(bx: Harness) -> None:
    await bx.install()
    bx.router.post(f"{REST}batch").mock(
        return_value=_ok(
            {"result": {"a": 1, "b": 2}, "result_error": [], "result_total": [], "result_next": []}
        )
    )

    outcome = await bx.client.batch(
        MEMBER_ID, {"a": ("crm.contact.add", CONTACT), "b": ("crm.contact.add", {})}
    )

    assert outcome.results == {"a": 1, "b": 2}
    assert outcome.errors == {}


@pytest.mark.anyio
async def test_batch_where_every_command_failed_has_an_empty_result_array(bx: Harness) -> None:
    await bx.install()
    bx.router.post(f"{REST}batch").mock(
        return_value=_ok(
            {
                "result": [],
                "result_error": {"a": {"error": "insufficient_scope", "error_description": ""}},
                "result_total": [],
                "result_next": [],
                "result_time": [],
            }
        )
    )

    outcome = await bx.client.batch(MEMBER_ID, {"a": ("crm.contact.add", CONTACT)})

    assert outcome.results == {}
    error = outcome.errors["a"]
    assert isinstance(error, BitrixScopeMissing)
    assert error.error == "insufficient_scope"


@pytest.mark.anyio
async def test_batch_command_missing_from_the_reply_is_a_retryable_error(bx: Harness) -> None:
    await bx.install()
    bx.router.post(f"{REST}batch").mock(return_value=_ok({"result": {"a": 1}, "result_error": []}))

    outcome = await bx.client.batch(MEMBER_ID, {"a": ("app.info", {}), "b": ("app.info", {})})

    assert outcome.results == {"a": 1}
    assert isinstance(outcome.errors["b"], BitrixServerError)
    assert outcome.errors["b"].retryable


@pytest.mark.anyio
async def test_batch_itself_failing_raises(bx: Harness) -> None:
    await bx.install()
    bx.router.post(f"{REST}batch").mock(return_value=_err(400, "ERROR_BATCH_LENGTH_EXCEEDED", "Max batch"))

    with pytest.raises(BitrixApiError, match="ERROR_BATCH_LENGTH_EXCEEDED"):
        await bx.client.batch(MEMBER_ID, {"a": ("app.info", {})})


def test_php_query_encodes_nested_params_like_http_build_query() -> None:
    query = php_query({"fields": {"NAME": "Ivan", "PHONE": [{"VALUE": "+7 999", "VALUE_TYPE": "WORK"}]}})

    assert query == (
        "fields%5BNAME%5D=Ivan&fields%5BPHONE%5D%5B0%5D%5BVALUE%5D=%2B7%20999"
        "&fields%5BPHONE%5D%5B0%5D%5BVALUE_TYPE%5D=WORK"
    )


def test_php_query_escapes_separators_and_encodes_scalars() -> None:
    query = php_query({"a": "x&y=z", "b": True, "c": False, "d": None, "e": 5, "f": "Иван"})

    assert query == "a=x%26y%3Dz&b=1&c=0&d=&e=5&f=%D0%98%D0%B2%D0%B0%D0%BD"


def test_php_query_round_trips_through_the_php_form_parser() -> None:
    params = {"filter": {"ORIGINATOR_ID": "robot", "ORIGIN_ID": "a|b c"}, "select": ["ID", "NAME"]}

    assert parse_php_form(php_query(params)) == params


# --- code exchange -----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_exchange_code_posts_the_code_to_the_oauth_server_only(bx: Harness) -> None:
    route = bx.router.post(TOKEN_URL).mock(return_value=_token_reply())

    reply = await bx.client.exchange_code("avmocpghblyi01m3h42bljvqtyd19sw1")

    assert (reply.access_token, reply.refresh_token, reply.member_id) == (NEW_ACCESS, NEW_REFRESH, MEMBER_ID)
    assert route.call_count == 1
    assert bx.router.calls.call_count == 1
    request = route.calls.last.request
    assert request.url.query == b""
    assert _form(request) == {
        "grant_type": "authorization_code",
        "code": "avmocpghblyi01m3h42bljvqtyd19sw1",
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
    }


@pytest.mark.anyio
async def test_exchange_code_refused_raises_invalid_grant(bx: Harness) -> None:
    bx.router.post(TOKEN_URL).mock(return_value=_err(400, "invalid_grant", "Invalid authorization code"))

    with pytest.raises(OAuthInvalidGrant):
        await bx.client.exchange_code("stale-code")


@pytest.mark.anyio
async def test_exchange_code_with_an_unreadable_reply_is_an_oauth_error(bx: Harness) -> None:
    bx.router.post(TOKEN_URL).mock(return_value=httpx.Response(200, json={"access_token": "only"}))

    with pytest.raises(OAuthError):
        await bx.client.exchange_code("code")


@pytest.mark.anyio
async def test_exchange_code_without_credentials_sends_nothing(bx: Harness) -> None:
    bx.settings.bitrix_client_secret = None

    with pytest.raises(OAuthInvalidClient):
        await bx.client.exchange_code("code")

    assert bx.router.calls.call_count == 0


@pytest.mark.anyio
async def test_a_revoked_token_marks_the_portal_disconnected_and_is_not_sent_again(bx: Harness) -> None:
    await bx.install()
    route = bx.router.post(f"{REST}app.info").mock(return_value=_err(401, "NO_AUTH_FOUND", "Wrong auth"))

    with pytest.raises(BitrixAuthError):
        await bx.client.call(MEMBER_ID, "app.info")
    with pytest.raises(PortalNotConnected, match="NO_AUTH_FOUND"):
        await bx.client.call(MEMBER_ID, "app.info")

    assert route.call_count == 1
    assert "NO_AUTH_FOUND" in bx.stored()["disconnected_reason"]
    assert bx.stored()["access_token"] == OLD_ACCESS
