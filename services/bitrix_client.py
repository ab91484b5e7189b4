"""Bitrix24 REST and OAuth client on one shared `httpx.AsyncClient`.

All REST traffic goes through `_send`, which maps the reply to the error tree (in
`services/bitrix_errors.py`); all token refreshes go through `_refresh`, which serialises them per
portal and persists the rotated pair before anything is replayed.
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
from repositories.token_store import TokenStore, TokenStoreError, amend
from schemas import PortalTokens, TokenResponse
from services import metrics, portal_moves
from services.batch_refs import has_batch_reference
from services.bitrix_errors import (
    _OAUTH_ERRORS,
    BitrixAccessDenied,
    BitrixApiError,
    BitrixAppNotInstalled,
    BitrixAuthError,
    BitrixConfirmationDenied,
    BitrixConfirmationPending,
    BitrixError,
    BitrixInvalidCredentials,
    BitrixMethodLimited,
    BitrixPaymentRequired,
    BitrixRateLimitError,
    BitrixScopeMissing,
    BitrixServerError,
    BitrixTokenExpired,
    BitrixTransportError,
    BitrixUserInactive,
    BitrixWrongAuthType,
    NoSpareCapacity,
    OAuthError,
    OAuthInvalidClient,
    OAuthInvalidGrant,
    OAuthPaymentRequired,
    PortalMoved,
    PortalNotConnected,
    action_hint,
    api_error,
)
from services.method_limits import MethodLimits
from services.oauth_servers import token_endpoint
from services.rate_limit import PortalRateLimiter
from services.retry import RetryPolicy
from services.trust import rest_base

# The error tree lives in services/bitrix_errors.py; callers keep importing it from here.
__all__ = [
    "BatchResult",
    "BitrixAccessDenied",
    "BitrixApiError",
    "BitrixAppNotInstalled",
    "BitrixAuthError",
    "BitrixClient",
    "BitrixConfirmationDenied",
    "BitrixConfirmationPending",
    "BitrixError",
    "BitrixInvalidCredentials",
    "BitrixMethodLimited",
    "BitrixPaymentRequired",
    "BitrixRateLimitError",
    "BitrixScopeMissing",
    "BitrixServerError",
    "BitrixTokenExpired",
    "BitrixTransportError",
    "BitrixUserInactive",
    "BitrixWrongAuthType",
    "Commands",
    "NoSpareCapacity",
    "OAuthError",
    "OAuthInvalidClient",
    "OAuthInvalidGrant",
    "OAuthPaymentRequired",
    "PortalMoved",
    "PortalNotConnected",
    "Sleep",
    "action_hint",
    "api_error",
    "php_query",
]

logger = logging.getLogger(__name__)

Sleep = Callable[[float], Awaitable[None]]


_DEAD_REFRESH = (
    "The authorization server refused its refresh token (invalid_grant): unused for 180 days, "
    "revoked, or already used by an older copy of the token file"
)


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
    errors: dict[str, BitrixError] = field(default_factory=dict)


Commands = Mapping[str, tuple[str, Mapping[str, Any]]]


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
        limits: MethodLimits | None = None,
    ) -> None:
        self._http = http
        self._tokens = tokens
        self._settings = settings
        self._limiter = limiter
        self._policy = policy or RetryPolicy()
        self._sleep = sleep
        self.limits = limits or MethodLimits()

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
            BitrixMethodLimited: the method is blocked by the portal's time limit (not sent).
            BitrixError: the call failed after the retry policy gave up.
        """
        record = await self._usable_record(member_id)
        try:
            return await self._call_with_retry(record, method, params or {}, idempotent)
        except BitrixTokenExpired:
            record = await self._refresh(member_id, stale_token=record.access_token)
            return await self._call_with_retry(record, method, params or {}, idempotent)
        except BitrixAuthError as exc:
            # Revoked: the pair no longer works, and the portal's next robot call may replace it.
            async with self._tokens.refresh_lock(member_id):
                reason = f"The portal refused its token ({exc})"
                await self._disconnect(member_id, record.access_token, reason)
            raise

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

    async def probe_with_token(
        self, client_endpoint: str, access_token: str, method: str, time_limit: float
    ) -> Any:
        """One request with an unproven token: no retry, a short timeout, and only if the portal's
        rate limit has room to spare. The portal counts every request, a forged token's too, before
        it checks the token (wire doc 4.1): a stranger's install must not spend what robot work needs.

        Raises:
            NoSpareCapacity: four fifths of the portal's bucket or more stayed in use for `time_limit`;
                nothing was sent.
            BitrixError: the call failed.
        """
        url = client_endpoint.rstrip("/") + "/" + method
        if not await self._limiter.try_spare(urlsplit(url).netloc, wait=time_limit):
            raise NoSpareCapacity(f"{method}: the portal's rate limit has no room to spare")
        try:
            response = await self._http.post(url, json={"auth": access_token}, timeout=time_limit)
        except httpx.HTTPError as exc:
            raise BitrixTransportError(f"{method}: {type(exc).__name__} talking to {url}") from exc
        logger.info("REST %s -> %d (install proof)", url, response.status_code)
        result, _ = _envelope_result(response, method)  # the time block: only robot work tracks it
        return result

    async def refresh_unstored(self, refresh_token: str, server_endpoint: str | None) -> TokenResponse:
        """Refresh a pair the store does not hold yet (an install's), at its authorization server
        if that is a known one (services/oauth_servers.py), else at `BITRIX_OAUTH_URL`.

        The reply names the portal the authorization server issued the pair for: `member_id` and
        `client_endpoint`. b24restdocs settings/oauth/index.md: the authorization server is "the
        only trusted source" about the application on a portal.

        Raises:
            OAuthError: the server refused the refresh token or our credentials.
        """
        grant = {"grant_type": "refresh_token", "refresh_token": refresh_token}
        return await self._token_request(grant, token_endpoint(self._settings, server_endpoint))

    async def batch(self, member_id: str, commands: Commands, *, idempotent: bool = True) -> BatchResult:
        """Run up to 50 commands in one request; each command succeeds or fails on its own.

        A command whose method is blocked by the portal's time limit is not sent (its error is a
        `BitrixMethodLimited`); a command holding a value `batch` would rewrite (`$result[...]`,
        see `services.batch_refs`) is sent on its own request.

        Raises:
            BitrixError: the batch request itself failed (as for `call`, `idempotent` included).
        """
        outcome = BatchResult()
        alone = {key: c for key, c in commands.items() if has_batch_reference(c[1])}
        together = self._admit(member_id, {k: c for k, c in commands.items() if k not in alone}, outcome)
        try:
            if together:
                await self._batch_request(member_id, together, outcome, idempotent)
        except BitrixMethodLimited:
            alone.update(together)  # `batch` itself is blocked: send its commands one by one
        finally:
            for method in {method for method, _ in together.values()}:
                self.limits.settle(member_id, method)
        for key, (method, params) in alone.items():
            await self._call_alone(member_id, key, method, params, outcome, idempotent)
        return outcome

    def _admit(self, member_id: str, commands: Commands, outcome: BatchResult) -> dict[str, Any]:
        """The commands that may be sent now; the others get their method's `BitrixMethodLimited`.

        Past a block's reset time the first command of the method is its probe and the rest of the
        method waits for the probe's outcome (`MethodLimits.check` says so for every later command).
        """
        admitted: dict[str, Any] = {}
        for key, (method, params) in commands.items():
            blocked = self.limits.check(member_id, method)
            if blocked is None:
                admitted[key] = (method, params)
            else:
                outcome.errors[key] = _limited(method, blocked.until)
        return admitted

    async def _batch_request(
        self, member_id: str, commands: Commands, outcome: BatchResult, idempotent: bool
    ) -> None:
        cmd = {key: f"{method}?{php_query(params)}" for key, (method, params) in commands.items()}
        reply = await self.call(member_id, "batch", {"halt": 0, "cmd": cmd}, idempotent=idempotent)
        methods = {key: method for key, (method, _) in commands.items()}
        _batch_result(reply, methods, outcome)
        self._observe_batch(member_id, reply, methods, outcome)

    def _observe_batch(
        self, member_id: str, reply: Any, methods: Mapping[str, str], outcome: BatchResult
    ) -> None:
        """Each command inside `batch` counts against its own method's time limit (limits.md)."""
        times = reply.get("result_time") if isinstance(reply, dict) else None
        for key, method in methods.items():
            error = outcome.errors.get(key)
            if isinstance(error, BitrixMethodLimited):
                error.resume_at = self.limits.block(member_id, method)
            elif error is None:  # it ran, so it is not blocked, with or without figures
                self.limits.observe(member_id, method, times.get(key) if isinstance(times, dict) else None)

    async def _call_alone(
        self,
        member_id: str,
        key: str,
        method: str,
        params: Mapping[str, Any],
        outcome: BatchResult,
        idempotent: bool = True,
    ) -> None:
        try:
            outcome.results[key] = await self.call(member_id, method, params, idempotent=idempotent)
        except (PortalNotConnected, OAuthError):
            raise  # as the whole batch would: nothing can be sent for this portal
        except BitrixError as exc:
            outcome.errors[key] = exc

    async def exchange_code(self, code: str, server_domain: str | None = None) -> TokenResponse:
        """Exchange an authorization code at the portal's authorization server.

        `server_domain` (from the OAuth redirect) is used only when it is `oauth.bitrix.info`,
        `oauth.bitrix24.tech` or the host of `BITRIX_OAUTH_URL` (`services.oauth_servers`).

        Raises:
            OAuthError: the server refused the code or the client credentials.
        """
        grant = {"grant_type": "authorization_code", "code": code}
        return await self._token_request(grant, token_endpoint(self._settings, server_domain))

    async def _usable_record(self, member_id: str) -> PortalTokens:
        record = await self._tokens.get(member_id)
        if record is None or not record.access_token:
            raise PortalNotConnected(f"No tokens stored for portal {member_id}")
        if record.disconnected_reason:
            raise PortalNotConnected(f"Portal {record.domain} is disconnected: {record.disconnected_reason}")
        if record.expires_within(self._settings.token_refresh_margin_seconds):
            return await self._refresh(member_id, stale_token=record.access_token)
        return record

    async def _refresh(self, member_id: str, stale_token: str | None) -> PortalTokens:
        """The only place tokens are refreshed: one refresh per portal at a time, across processes."""
        async with self._tokens.refresh_lock(member_id):
            # Another task or worker process may have refreshed while we waited for the lock.
            record = await self._tokens.get(member_id, fresh=True)
            if record is None or not record.refresh_token or record.disconnected_reason:
                reason = record.disconnected_reason if record else None
                raise PortalNotConnected(reason or f"No refresh token stored for portal {member_id}")
            margin = self._settings.token_refresh_margin_seconds
            if record.access_token != stale_token and not record.expires_within(margin):
                return record
            # A rotated pair not yet on disk is never rotated again: a crash would lose both.
            await self._tokens.flush(member_id)
            logger.info("Refreshing the access token of portal %s", record.domain)
            try:
                reply = await self._token_request(
                    {"grant_type": "refresh_token", "refresh_token": record.refresh_token},
                    token_endpoint(self._settings, record.server_endpoint),
                )
            except OAuthError as exc:
                metrics.TOKEN_REFRESHES.labels(outcome="refused").inc()
                logger.error(
                    "Refreshing the token of portal %s failed: %s. %s", record.domain, exc, exc.admin_hint
                )
                if isinstance(exc, OAuthInvalidGrant):
                    await self._disconnect(member_id, record.access_token, _DEAD_REFRESH)
                raise
            except BitrixError:
                metrics.TOKEN_REFRESHES.labels(outcome="error").inc()
                raise
            metrics.TOKEN_REFRESHES.labels(outcome="ok").inc()
            updated = self._moved_by_refresh(record, reply).with_tokens(reply)
            # Persist before replaying: the old refresh token is already dead on the server. If the
            # disk refuses, the store keeps the pair in memory and saves it later; it is not lost.
            await self._tokens.save_rotated(updated)
            logger.info("Access token of portal %s refreshed", updated.domain)
            return updated

    async def _disconnect(self, member_id: str, refused_token: str | None, reason: str) -> None:
        """Record (under the refresh lock) that the stored pair no longer works, unless replaced meanwhile."""
        record = await self._tokens.get(member_id, fresh=True)
        if record is None or record.access_token != refused_token or record.disconnected_reason:
            return
        reason = f"{reason}. The portal's next robot call reconnects it, or open /oauth/login."
        logger.error("Portal %s is disconnected: %s", record.domain, reason)
        try:
            await self._tokens.save(record.model_copy(update={"disconnected_reason": reason}))
        except TokenStoreError as exc:
            logger.error("%s", exc)

    async def renew(self, member_id: str, stale_token: str | None) -> PortalTokens:
        """Refresh now, unless another task or process has refreshed since `stale_token` was read.

        Raises:
            PortalNotConnected, OAuthError, BitrixError: as for `call`.
            TokenStoreError: the token file cannot be read, or a kept pair cannot be saved yet.
        """
        return await self._refresh(member_id, stale_token)

    def _moved_by_refresh(self, record: PortalTokens, reply: TokenResponse) -> PortalTokens:
        """A refresh reply names the portal's current address (`client_endpoint`): follow a rename."""
        if reply.member_id != record.member_id or rest_base(reply.client_endpoint) == rest_base(
            record.client_endpoint
        ):
            return record
        try:
            return portal_moves.moved_record(self._settings, record, reply.client_endpoint)
        except portal_moves.MoveRefused:
            return record.model_copy(update={"moved_to": rest_base(reply.client_endpoint)})

    async def _token_request(self, grant: Mapping[str, str], url: str) -> TokenResponse:
        secret = self._settings.bitrix_client_secret
        if not self._settings.bitrix_client_id or secret is None:
            raise OAuthInvalidClient(
                0, "not_configured", "BITRIX_CLIENT_ID or BITRIX_CLIENT_SECRET is not set"
            )
        # The secret goes in a POST body, to an allowed authorization server only, never into a URL.
        body = {
            **grant,
            "client_id": self._settings.bitrix_client_id,
            "client_secret": secret.get_secret_value(),
        }
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
                # An error with a resume time is for the job worker to reschedule, not to hammer now;
                # a request that may have run is not sent again if running it twice does harm.
                if exc.resume_at is not None or not self._policy.should_retry(exc, attempt):
                    raise
                if exc.may_have_run and not idempotent:
                    raise
                delay = self._policy.delay(attempt, exc.retry_after)
                logger.warning("%s failed (%s); retry %d in %.1fs", method, exc, attempt + 1, delay)
                await self._sleep(delay)
                attempt += 1

    async def _send(self, record: PortalTokens, method: str, params: Mapping[str, Any]) -> Any:
        """One HTTP request to the portal (following a rename), mapped to a result or a typed error."""
        member = record.member_id
        blocked = self.limits.check(member, method)
        if blocked is not None:
            raise _limited(method, blocked.until)
        pace = self.limits.pace(member, method)
        if pace:
            await self._sleep(pace)  # near the method's time limit: slow down before the portal blocks it
        try:
            response = await self._post(record, method, params)
            result, block = _envelope_result(response, method)
        except BitrixMethodLimited as exc:
            exc.resume_at = self.limits.block(member, method)
            raise
        finally:
            self.limits.settle(member, method)
        self.limits.observe(member, method, block)
        return result

    async def _post(self, record: PortalTokens, method: str, params: Mapping[str, Any]) -> httpx.Response:
        # The token travels in the JSON body, so the URL we log carries no secret.
        body = {**params, "auth": record.access_token}
        response = await self._post_once(record.client_endpoint, method, body)
        if response.is_redirect and "location" in response.headers:
            # A renamed portal answers 302 from its old address; the POST must be sent again with
            # its body (settings/how-to-call-rest-api/change-domen.md), not turned into a GET.
            moved = await self._follow_move(record, response.headers["location"])
            response = await self._post_once(moved.client_endpoint, method, body)
        return response

    async def _post_once(self, endpoint: str, method: str, body: Mapping[str, Any]) -> httpx.Response:
        url = endpoint.rstrip("/") + "/" + method
        await self._limiter.acquire(urlsplit(url).netloc)
        started = time.perf_counter()
        try:
            response = await self._http.post(url, json=body, follow_redirects=False)
        except httpx.HTTPError as exc:
            metrics.observe_rest(method, None, time.perf_counter() - started)
            # Only a connection never made proves the request did not run; a read timeout does not.
            unsent = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)
            raise BitrixTransportError(
                f"{method}: {type(exc).__name__} talking to {url}", may_have_run=not unsent
            ) from exc
        metrics.observe_rest(method, response.status_code, time.perf_counter() - started)
        elapsed = (time.perf_counter() - started) * 1000
        logger.info("REST %s -> %d in %.0f ms", url, response.status_code, elapsed)
        logger.debug("REST %s reply: %s", method, response.text[:2000])
        return response

    async def _follow_move(self, record: PortalTokens, location: str) -> PortalTokens:
        """The portal's new address, stored, if the settings allow it; else PortalMoved."""
        new_endpoint = portal_moves.endpoint_from_location(record.client_endpoint, location)
        try:
            moved = portal_moves.moved_record(self._settings, record, new_endpoint)
        except portal_moves.MoveRefused as exc:
            await self._remember_move(record.member_id, {"moved_to": rest_base(new_endpoint)})
            raise PortalMoved(str(exc), exc.new_url) from exc
        keys = ("domain", "client_endpoint", "renamed_from", "moved_to")
        await self._remember_move(record.member_id, {key: getattr(moved, key) for key in keys})
        return moved

    async def _remember_move(self, member_id: str, update: dict[str, Any]) -> None:
        if member_id == "-":  # a token being proven at install: no record to update yet
            return
        # Amended, not rewritten: the record read before the request may hold a pair another task
        # or instance has rotated since, and saving it back would restore a spent refresh token.
        await amend(self._tokens, member_id, update)


def _limited(method: str, until: float) -> BitrixMethodLimited:
    error = BitrixMethodLimited(
        429, "OPERATION_TIME_LIMIT", "blocked until the portal resets its time limit (not sent)", method
    )
    error.resume_at = until
    return error


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


def _envelope_result(response: httpx.Response, method: str) -> tuple[Any, Any]:
    """The `result` and the `time` block of a reply, or its typed error."""
    data = _json_or_none(response)
    if isinstance(data, dict) and "error" in data:
        error = api_error(
            response.status_code, str(data["error"] or ""), str(data.get("error_description") or ""), method
        )
        error.retry_after = _retry_after(response)
        raise error
    if not isinstance(data, dict) or "result" not in data:
        raise BitrixServerError(response.status_code, "", "unreadable reply", method)
    return data["result"], data.get("time")


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


def _batch_result(reply: Any, methods: Mapping[str, str], outcome: BatchResult) -> None:
    body = reply if isinstance(reply, dict) else {}
    results = body.get("result") or {}
    errors = body.get("result_error") or {}
    for key, method in methods.items():
        if isinstance(errors, dict) and key in errors:
            item = errors[key] if isinstance(errors[key], dict) else {}
            code, text = str(item.get("error") or ""), str(item.get("error_description") or "")
            error = api_error(400, code, text, method)
            error.may_have_run = False  # the portal ran the command and reports how it failed
            outcome.errors[key] = error
        elif isinstance(results, dict) and key in results:
            outcome.results[key] = results[key]
        else:
            outcome.errors[key] = BitrixServerError(500, "", "command missing from the batch reply", method)
