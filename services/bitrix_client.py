"""Bitrix24 REST and OAuth client on one shared `httpx.AsyncClient`.

All REST traffic goes through `_send`, which maps the reply to the error tree below; all token
refreshes go through `_refresh`, which serialises them per portal and persists the rotated pair
before anything is replayed.

    BitrixError                        retryable?
    ├── BitrixTransportError           yes  connect/read timeout, connection reset
    ├── BitrixApiError                 no   the portal answered with an `error` envelope
    │   ├── BitrixAuthError            no   NO_AUTH_FOUND, invalid_token, 401
    │   │   └── BitrixTokenExpired     no   expired_token: refresh once, replay once
    │   ├── BitrixAccessDenied         no   ACCESS_DENIED (e.g. a workflow that is gone)
    │   ├── BitrixRateLimitError       yes  QUERY_LIMIT_EXCEEDED (503), OPERATION_TIME_LIMIT (429)
    │   └── BitrixServerError          yes  5xx, unreadable replies
    ├── OAuthError                     no   the authorization server refused to issue tokens
    │   ├── OAuthInvalidGrant          no   invalid_grant: re-authorize at /oauth/login
    │   ├── OAuthInvalidClient         no   invalid_client, wrong_client: check the credentials
    │   └── OAuthPaymentRequired       no   PAYMENT_REQUIRED: renew the subscription
    └── PortalNotConnected             no   no usable tokens are stored for the portal
"""

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
from pydantic import ValidationError

from config import Settings
from repositories.token_store import TokenStore
from schemas import PortalTokens, TokenResponse
from services.rate_limit import PortalRateLimiter
from services.retry import RetryPolicy

logger = logging.getLogger(__name__)

Sleep = Callable[[float], Awaitable[None]]


class BitrixError(Exception):
    """Base of every failure talking to Bitrix24."""

    retryable = False
    # Whether the portal may have run the request although the app got no answer (a read timeout,
    # a 5xx): a non-idempotent request must then not be sent again blindly.
    may_have_run = False
    admin_hint = "Check the portal and the app's log."

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class BitrixTransportError(BitrixError):
    retryable = True
    admin_hint = "The portal could not be reached; check the network between the app and Bitrix24."

    def __init__(self, message: str, *, may_have_run: bool = True) -> None:
        super().__init__(message)
        self.may_have_run = may_have_run


class BitrixApiError(BitrixError):
    """An error envelope: `error` may be an empty string, `error_description` is technical text."""

    def __init__(self, status_code: int, error: str, description: str, method: str) -> None:
        label = error or "error"
        super().__init__(f"{method}: {label} ({status_code}): {description}")
        self.status_code = status_code
        self.error = error
        self.description = description
        self.method = method


class BitrixAuthError(BitrixApiError):
    admin_hint = "The portal rejected the app's token; open /oauth/login to authorize the app again."


class BitrixTokenExpired(BitrixAuthError):
    pass


class BitrixAccessDenied(BitrixApiError):
    admin_hint = "Access denied by the portal; check the app's scopes (crm, bizproc) and user rights."


class BitrixRateLimitError(BitrixApiError):
    retryable = True
    admin_hint = "The portal's REST rate limit was exceeded; the app retried and gave up."


class BitrixServerError(BitrixApiError):
    retryable = True
    may_have_run = True
    admin_hint = "The portal answered with a server error; the app retried and gave up."


class OAuthError(BitrixError):
    def __init__(self, status_code: int, error: str, description: str) -> None:
        super().__init__(f"OAuth server: {error or 'error'} ({status_code}): {description}")
        self.status_code = status_code
        self.error = error


class OAuthInvalidGrant(OAuthError):
    admin_hint = "The refresh token is no longer valid; open /oauth/login to authorize the app again."


class OAuthInvalidClient(OAuthError):
    admin_hint = "The OAuth server rejected the app; check BITRIX_CLIENT_ID and BITRIX_CLIENT_SECRET."


class OAuthPaymentRequired(OAuthError):
    admin_hint = "The app's subscription on the portal has expired; renew it in the portal."


class PortalNotConnected(BitrixError):
    admin_hint = "The app holds no tokens for this portal; install the app or open /oauth/login."


_AUTH_CODES = {"NO_AUTH_FOUND", "INVALID_TOKEN", "INVALID_CREDENTIALS", "WRONG_AUTH_TYPE"}
_RATE_CODES = {"QUERY_LIMIT_EXCEEDED", "OPERATION_TIME_LIMIT", "OVERLOAD_LIMIT"}
_PERMANENT_CODES = {"PORTAL_DELETED"}  # a 500 that no retry will fix
_SERVER_CODES = {"INTERNAL_SERVER_ERROR", "ERROR_UNEXPECTED_ANSWER"}
_OAUTH_ERRORS: dict[str, type[OAuthError]] = {
    "invalid_grant": OAuthInvalidGrant,
    "invalid_client": OAuthInvalidClient,
    "wrong_client": OAuthInvalidClient,
    "payment_required": OAuthPaymentRequired,
}


def api_error(status_code: int, error: str, description: str, method: str) -> BitrixApiError:
    """The typed error for one error envelope: the body's code first, then the HTTP status."""
    code = error.upper()
    cls: type[BitrixApiError]
    if code == "EXPIRED_TOKEN":
        cls = BitrixTokenExpired
    elif code in _AUTH_CODES or (status_code == 401 and not code):
        cls = BitrixAuthError
    elif code in _RATE_CODES or (status_code in (429, 503) and not code):
        cls = BitrixRateLimitError
    elif code in _PERMANENT_CODES:
        cls = BitrixApiError
    elif code == "ACCESS_DENIED":
        cls = BitrixAccessDenied
    elif code in _SERVER_CODES or status_code >= 500:
        cls = BitrixServerError
    else:
        cls = BitrixApiError
    return cls(status_code, error, description, method)


def php_query(params: Mapping[str, Any]) -> str:
    """Encode nested params like PHP's `http_build_query`, as `batch` commands need them."""
    pairs: list[str] = []
    _flatten(pairs, "", params)
    return "&".join(pairs)


def _flatten(pairs: list[str], prefix: str, value: Any) -> None:
    if isinstance(value, Mapping):
        for key, item in value.items():
            _flatten(pairs, f"{prefix}[{key}]" if prefix else str(key), item)
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _flatten(pairs, f"{prefix}[{index}]", item)
    else:
        pairs.append(f"{quote(prefix, safe='')}={quote(_scalar(value), safe='')}")


def _scalar(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


@dataclass
class BatchResult:
    """Per-command outcome of a `batch` call: errors never fail the neighbours."""

    results: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, BitrixApiError] = field(default_factory=dict)


class BitrixClient:
    """Calls Bitrix24 REST for installed portals and talks to the OAuth server."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        tokens: TokenStore,
        settings: Settings,
        limiter: PortalRateLimiter,
        policy: RetryPolicy | None = None,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._http = http
        self._tokens = tokens
        self._settings = settings
        self._limiter = limiter
        self._policy = policy or RetryPolicy()
        self._sleep = sleep

    async def call(
        self,
        member_id: str,
        method: str,
        params: Mapping[str, Any] | None = None,
        *,
        idempotent: bool = True,
    ) -> Any:
        """Call `method` on an installed portal with its stored token.

        Refreshes the token first when it is about to expire, and once more (then replays the
        call once) when the portal says `expired_token`. A call that is not `idempotent` is
        retried only after failures that prove it did not run (connection refused, rate limit).

        Raises:
            PortalNotConnected: no tokens are stored for `member_id`.
            OAuthError: a needed refresh was refused.
            BitrixError: the call failed after the retry policy gave up.
        """
        record = await self._usable_record(member_id)
        try:
            return await self._call_with_retry(record, method, params or {}, idempotent)
        except BitrixTokenExpired:
            record = await self._refresh(member_id, stale_token=record.access_token)
            return await self._call_with_retry(record, method, params or {}, idempotent)

    async def call_with_token(
        self, client_endpoint: str, access_token: str, method: str, params: Mapping[str, Any] | None = None
    ) -> Any:
        """Call `method` with a token the store does not hold (to prove an install's tokens).

        Raises:
            BitrixError: the call failed; no refresh is attempted.
        """
        record = PortalTokens(
            member_id="-", domain="-", client_endpoint=client_endpoint, access_token=access_token
        )
        return await self._call_with_retry(record, method, params or {})

    async def batch(
        self,
        member_id: str,
        commands: Mapping[str, tuple[str, Mapping[str, Any]]],
        *,
        idempotent: bool = True,
    ) -> BatchResult:
        """Run up to 50 commands in one request; each command succeeds or fails on its own.

        Raises:
            BitrixError: the batch request itself failed (as for `call`, `idempotent` included).
        """
        cmd = {key: f"{method}?{php_query(params)}" for key, (method, params) in commands.items()}
        reply = await self.call(member_id, "batch", {"halt": 0, "cmd": cmd}, idempotent=idempotent)
        return _batch_result(reply, {key: method for key, (method, _) in commands.items()})

    async def exchange_code(self, code: str) -> TokenResponse:
        """Exchange an authorization code at the OAuth server (`BITRIX_OAUTH_URL` only).

        Raises:
            OAuthError: the server refused the code or the client credentials.
        """
        return await self._token_request({"grant_type": "authorization_code", "code": code})

    async def _usable_record(self, member_id: str) -> PortalTokens:
        record = await self._tokens.get(member_id)
        if record is None or not record.access_token:
            raise PortalNotConnected(f"No tokens stored for portal {member_id}")
        if record.expires_within(self._settings.token_refresh_margin_seconds):
            return await self._refresh(member_id, stale_token=record.access_token)
        return record

    async def _refresh(self, member_id: str, stale_token: str | None) -> PortalTokens:
        """The only place tokens are refreshed: one refresh per portal at a time, across processes."""
        async with self._tokens.refresh_lock(member_id):
            # Another task or worker process may have refreshed while we waited for the lock.
            record = await self._tokens.get(member_id, fresh=True)
            if record is None or not record.refresh_token:
                raise PortalNotConnected(f"No refresh token stored for portal {member_id}")
            margin = self._settings.token_refresh_margin_seconds
            if record.access_token != stale_token and not record.expires_within(margin):
                return record
            logger.info("Refreshing the access token of portal %s", record.domain)
            try:
                reply = await self._token_request(
                    {"grant_type": "refresh_token", "refresh_token": record.refresh_token}
                )
            except OAuthError as exc:
                logger.error(
                    "Refreshing the token of portal %s failed: %s. %s", record.domain, exc, exc.admin_hint
                )
                raise
            updated = record.with_tokens(reply)
            # Persist before replaying: the old refresh token is already dead on the server.
            await self._tokens.save(updated)
            logger.info("Access token of portal %s refreshed", record.domain)
            return updated

    async def _token_request(self, grant: Mapping[str, str]) -> TokenResponse:
        secret = self._settings.bitrix_client_secret
        if not self._settings.bitrix_client_id or secret is None:
            raise OAuthInvalidClient(
                0, "not_configured", "BITRIX_CLIENT_ID or BITRIX_CLIENT_SECRET is not set"
            )
        # The secret goes in a POST body, to the configured server only, never into a URL.
        body = {
            **grant,
            "client_id": self._settings.bitrix_client_id,
            "client_secret": secret.get_secret_value(),
        }
        url = self._settings.token_endpoint
        try:
            response = await self._http.post(url, data=body)
        except httpx.HTTPError as exc:
            raise BitrixTransportError(f"OAuth server {url} unreachable: {type(exc).__name__}") from exc
        return _token_reply(response)

    async def _call_with_retry(
        self, record: PortalTokens, method: str, params: Mapping[str, Any], idempotent: bool = True
    ) -> Any:
        attempt = 0
        while True:
            try:
                return await self._send(record, method, params)
            except BitrixError as exc:
                if not self._policy.should_retry(exc, attempt) or (exc.may_have_run and not idempotent):
                    raise
                delay = self._policy.delay(attempt, exc.retry_after)
                logger.warning("%s failed (%s); retry %d in %.1fs", method, exc, attempt + 1, delay)
                await self._sleep(delay)
                attempt += 1

    async def _send(self, record: PortalTokens, method: str, params: Mapping[str, Any]) -> Any:
        """One HTTP request to the portal, mapped to a result or a typed error."""
        url = record.client_endpoint.rstrip("/") + "/" + method
        await self._limiter.acquire(urlsplit(url).netloc)
        started = time.perf_counter()
        try:
            # The token travels in the JSON body, so the URL we log carries no secret.
            response = await self._http.post(url, json={**params, "auth": record.access_token})
        except httpx.HTTPError as exc:
            # Only a connection never made proves the request did not run; a read timeout does not.
            unsent = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)
            raise BitrixTransportError(
                f"{method}: {type(exc).__name__} talking to {url}", may_have_run=not unsent
            ) from exc
        elapsed = (time.perf_counter() - started) * 1000
        logger.info("REST %s -> %d in %.0f ms", url, response.status_code, elapsed)
        logger.debug("REST %s reply: %s", method, response.text[:2000])
        return _envelope_result(response, method)


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return float(response.headers["Retry-After"])
    except (KeyError, ValueError):
        return None


def _json_or_none(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _envelope_result(response: httpx.Response, method: str) -> Any:
    data = _json_or_none(response)
    if isinstance(data, dict) and "error" in data:
        error = api_error(
            response.status_code, str(data["error"] or ""), str(data.get("error_description") or ""), method
        )
        error.retry_after = _retry_after(response)
        raise error
    if not isinstance(data, dict) or "result" not in data:
        raise BitrixServerError(response.status_code, "", "unreadable reply", method)
    return data["result"]


def _token_reply(response: httpx.Response) -> TokenResponse:
    data = _json_or_none(response)
    if isinstance(data, dict) and data.get("error"):
        error = str(data["error"])
        cls = _OAUTH_ERRORS.get(error.lower(), OAuthError)
        raise cls(response.status_code, error, str(data.get("error_description") or ""))
    if response.status_code >= 500:
        raise BitrixServerError(response.status_code, "", "OAuth server error", "oauth.token")
    try:
        return TokenResponse.model_validate(data)
    except ValidationError as exc:
        raise OAuthError(response.status_code, "invalid_response", "unexpected token reply") from exc


def _batch_result(reply: Any, methods: Mapping[str, str]) -> BatchResult:
    outcome = BatchResult()
    body = reply if isinstance(reply, dict) else {}
    results = body.get("result") or {}
    errors = body.get("result_error") or {}
    for key, method in methods.items():
        if isinstance(errors, dict) and key in errors:
            item = errors[key] if isinstance(errors[key], dict) else {}
            code, text = str(item.get("error") or ""), str(item.get("error_description") or "")
            outcome.errors[key] = api_error(400, code, text, method)
        elif isinstance(results, dict) and key in results:
            outcome.results[key] = results[key]
        else:
            outcome.errors[key] = BitrixServerError(500, "", "command missing from the batch reply", method)
    return outcome
