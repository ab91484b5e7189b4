"""What the app does for each endpoint: install, OAuth, robot calls, uninstall, status."""

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx

from config import Settings
from repositories.job_journal import JobJournal, NewJob
from repositories.oauth_state_store import OAuthStateStore
from repositories.token_store import TokenStore, TokenStoreError, amend
from schemas import (
    REFRESH_TOKEN_LIFETIME,
    AppFrame,
    ClusterStatus,
    EventAuth,
    Health,
    HealthReason,
    IframeInstall,
    InstallEvent,
    PortalStatus,
    PortalTokens,
    RobotAck,
    RobotCall,
    StatusReport,
    TokenResponse,
    UninstallEvent,
    UpdateEvent,
    expiry,
)
from services import messages, metrics
from services.bitrix_client import (
    BitrixApiError,
    BitrixClient,
    BitrixError,
    NoSpareCapacity,
    OAuthError,
)
from services.errors import (
    AppError,
    BadRequest,
    ForeignPortal,
    InstallRejected,
    InvalidOAuthState,
    NotConfigured,
    TooManyInstalls,
    UpstreamUnavailable,
)
from services.handler_check import handler_warnings
from services.health import Observations, portal_usable, reason_text, verdict
from services.install_guard import PROOF_TIMEOUT_SECONDS, ProofGate
from services.observability import portal_var, register_secret, workflow_var
from services.portal_moves import move_advice
from services.robot_registration import Outcome, RobotRegistration
from services.trust import allowed_portal, verify_callback

logger = logging.getLogger(__name__)

STATE_TTL_SECONDS = 600.0
_RECONNECT = "The portal's next robot call reconnects it, or open /oauth/login."


@dataclass(frozen=True)
class LoginRedirect:
    url: str
    browser_nonce: str


@dataclass(frozen=True)
class Installed:
    """An install or update: the portal's record, and whether its robot is registered yet."""

    record: PortalTokens
    robot: Outcome


class ProcessingService:
    """The use cases behind the routes; routes parse and answer, this decides and acts."""

    def __init__(
        self,
        settings: Settings,
        tokens: TokenStore,
        bitrix: BitrixClient,
        journal: JobJournal,
        states: OAuthStateStore,
        wake_worker: Callable[[], None],
        robots: RobotRegistration,
        cluster: Callable[[], Awaitable[ClusterStatus]] | None = None,
    ) -> None:
        self._settings = settings
        self._tokens = tokens
        self._bitrix = bitrix
        self._journal = journal
        self._states = states
        self._wake_worker = wake_worker
        self._robots = robots
        self._cluster = cluster
        self._proofs = ProofGate()

    # --- install -------------------------------------------------------------------------------

    async def install_from_event(self, event: InstallEvent) -> Installed:
        """Server-to-server ONAPPINSTALL: prove the tokens, store them, register the robot."""
        self._require_configured()
        auth = event.auth
        if not auth.access_token or not auth.refresh_token:
            raise BadRequest("The install event carries no access_token or refresh_token.")
        endpoint = allowed_portal(self._settings, auth.domain, auth.client_endpoint)
        candidate = PortalTokens(
            member_id=auth.member_id,
            domain=auth.domain.lower(),
            client_endpoint=endpoint,
            access_token=auth.access_token,
            refresh_token=auth.refresh_token,
            expires_at=expiry(auth.expires, auth.expires_in),
            application_token=auth.application_token,
            scope=auth.scope,
            user_id=auth.user_id,
            server_endpoint=auth.server_endpoint,
            language=_language_id(event.data.get("LANGUAGE_ID")),
            refresh_issued_at=time.time(),
        )
        return await self._install(candidate)

    async def install_from_frame(self, form: IframeInstall) -> Installed:
        """Install page opened in the portal frame (the UI install variant)."""
        self._require_configured()
        scheme = "https" if form.PROTOCOL == "1" else "http"
        endpoint = allowed_portal(self._settings, form.DOMAIN, f"{scheme}://{form.DOMAIN}/rest/")
        candidate = PortalTokens(
            member_id=form.member_id,
            domain=form.DOMAIN.lower(),
            client_endpoint=endpoint,
            access_token=form.AUTH_ID,
            refresh_token=form.REFRESH_ID,
            expires_at=expiry(None, form.AUTH_EXPIRES),
            application_token=form.APPLICATION_TOKEN,
            scope=form.APPLICATION_SCOPE,
            server_endpoint=form.SERVER_ENDPOINT,
            language=form.LANG or None,
            refresh_issued_at=time.time(),
        )
        return await self._install(candidate)

    async def _install(self, candidate: PortalTokens) -> Installed:
        """Prove and store the tokens, then register the robot and bind the events, all within
        INSTALL_TIMEOUT_SECONDS: a portal that hangs gets its answer in time, and an unfinished
        registration goes on in the background.
        """
        portal_var.set(candidate.domain)
        claimed = (candidate.access_token, candidate.refresh_token, candidate.application_token)
        deadline = asyncio.get_running_loop().time() + self._settings.install_timeout_seconds
        candidate = await self._prove_in_time(candidate, deadline)
        # Registered once proven: a flood of forged installs would otherwise churn the registry
        # (and rebuild its pattern) with every request. Nothing logged before this carries them.
        register_secret(*claimed)
        await self._tokens.save(candidate)
        logger.info("Install from portal %s (%s): tokens stored", candidate.domain, candidate.member_id)
        robot = await self._robots.register_within(
            candidate.member_id, deadline - asyncio.get_running_loop().time(), bind_events=True
        )
        return Installed(await self._tokens.get(candidate.member_id) or candidate, robot)

    async def _prove_in_time(self, candidate: PortalTokens, deadline: float) -> PortalTokens:
        try:
            async with asyncio.timeout_at(deadline):
                return await self._prove(candidate)
        except TimeoutError:
            raise _not_in_time(candidate.domain, self._settings.install_timeout_seconds) from None

    async def _prove(self, candidate: PortalTokens) -> PortalTokens:
        """The candidate as the portal and the authorization server vouch for it, or refused.

        Runs under the installs' own budget (services/install_guard.py), never the robot's.
        """
        async with self._proofs.slot(candidate.domain):
            await self._prove_ours(candidate)
            return await self._vouched(candidate)

    async def _prove_ours(self, candidate: PortalTokens) -> None:
        """Tokens count only once the portal they claim confirms they belong to our app."""
        token = candidate.access_token or ""
        try:
            info = await self._bitrix.probe_with_token(
                candidate.client_endpoint, token, "app.info", PROOF_TIMEOUT_SECONDS
            )
        except NoSpareCapacity as exc:
            raise TooManyInstalls(
                f"Too many installs of {candidate.domain} are being verified; the portal may retry later."
            ) from exc
        except BitrixError as exc:
            if isinstance(exc.__cause__, httpx.TimeoutException):  # the proof's own limit, not the install's
                raise _not_in_time(candidate.domain, PROOF_TIMEOUT_SECONDS) from exc
            raise _proof_failed(candidate.domain, "did not confirm the tokens", exc) from exc
        code = info.get("CODE") if isinstance(info, dict) else None
        if code != self._settings.bitrix_client_id:
            raise InstallRejected(f"The tokens belong to another app ({code!r}), not BITRIX_CLIENT_ID.")

    async def _vouched(self, candidate: PortalTokens) -> PortalTokens:
        """The record under the `member_id` the authorization server names for these tokens.

        The body's `member_id` is the caller's word; the refresh reply is the server's (b24restdocs
        settings/oauth/index.md). The refreshed pair replaces the install's, which is now spent.
        """
        try:
            refresh_token = candidate.refresh_token or ""
            reply = await self._bitrix.refresh_unstored(refresh_token, candidate.server_endpoint)
        except BitrixError as exc:
            raise _proof_failed(candidate.domain, "did not vouch for the refresh token", exc) from exc
        register_secret(reply.access_token, reply.refresh_token)
        host = urlsplit(reply.client_endpoint).netloc.lower()
        if reply.member_id != candidate.member_id or host != candidate.domain:
            raise InstallRejected(
                "The authorization server issued these tokens for another portal than the body names."
            )
        # The user stays the install's own: finding who installed is the robot registration's job.
        return candidate.with_tokens(reply).model_copy(update={"user_id": candidate.user_id})

    # --- update --------------------------------------------------------------------------------

    async def update_from_event(self, event: UpdateEvent) -> Installed:
        """ONAPPUPDATE: the portal deleted the robot; store the event's tokens, register it again."""
        portal_var.set(event.auth.domain)
        deadline = asyncio.get_running_loop().time() + self._settings.install_timeout_seconds
        # Verified like /uninstall. A request whose application_token differs is refused even if
        # its access token is valid: any user who opens the app holds such a token, and must not
        # be able to choose the secret that authenticates robot calls.
        stored = await self._tokens.get(event.auth.member_id)
        record = verify_callback(self._settings, stored, event.auth)
        # Amended, not rewritten: `stored` may hold a pair rotated since (the read cache, another
        # instance), and saving it back would restore a spent refresh token.
        changes = _event_changes(record, event)
        if changes:
            record = await amend(self._tokens, record.member_id, changes) or record
        version = event.data.get("VERSION", "?")
        logger.info(
            "App updated on portal %s (version %s): registering the robot again", record.domain, version
        )
        robot = await self._robots.register_within(
            record.member_id, deadline - asyncio.get_running_loop().time(), bind_events=False
        )
        return Installed(record, robot)

    # --- OAuth ---------------------------------------------------------------------------------

    async def start_login(self, domain: str | None) -> LoginRedirect:
        """Where to send the browser to start the authorization-code grant."""
        self._require_configured()
        portal_url = self._login_portal(domain)
        state, nonce = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        await self._states.put(state, nonce, portal_url, STATE_TTL_SECONDS)
        query = urlencode({"client_id": self._settings.bitrix_client_id, "state": state})
        logger.info("OAuth login started for %s", portal_url)
        return LoginRedirect(url=f"{portal_url}/oauth/authorize/?{query}", browser_nonce=nonce)

    def _login_portal(self, domain: str | None) -> str:
        configured = self._settings.bitrix_portal_url
        if domain:
            host = domain.strip().lower()
            scheme = urlsplit(configured).scheme if configured else "https"
            allowed_portal(self._settings, host, f"{scheme}://{host}/rest/")
            return f"{scheme}://{host}"
        if configured:
            return configured
        raise BadRequest("Set BITRIX_PORTAL_URL, or open /oauth/login?domain=your-portal.bitrix24.ru")

    async def finish_login(
        self,
        code: str | None,
        state: str | None,
        browser_nonce: str | None,
        server_domain: str | None = None,
    ) -> PortalTokens:
        """OAuth callback: check `state`, exchange `code`, store the tokens."""
        if not state:
            raise InvalidOAuthState("The OAuth callback has no state; start again at /oauth/login.")
        portal_url = await self._states.take(state, browser_nonce or "")
        if portal_url is None:
            raise InvalidOAuthState("Unknown, used or expired OAuth state; start again at /oauth/login.")
        if not code:
            raise BadRequest("The OAuth callback has no code.")
        register_secret(code)
        self._require_configured()
        try:
            reply = await self._bitrix.exchange_code(code, server_domain)
        except OAuthError as exc:
            raise InstallRejected(
                f"The authorization server refused the code: {exc}. {exc.admin_hint}"
            ) from exc
        except BitrixError as exc:
            raise UpstreamUnavailable(f"The authorization server could not be reached: {exc}") from exc
        register_secret(reply.access_token, reply.refresh_token)
        host = urlsplit(reply.client_endpoint).netloc.lower()
        endpoint = allowed_portal(self._settings, host, reply.client_endpoint)
        if host != urlsplit(portal_url).netloc.lower():
            raise ForeignPortal("The tokens are for another portal than the one the login started at.")
        return await self._store_login(reply.member_id, host, endpoint, reply)

    async def _store_login(
        self, member_id: str, host: str, endpoint: str, reply: TokenResponse
    ) -> PortalTokens:
        existing = await self._tokens.get(member_id)
        base = existing or PortalTokens(member_id=member_id, domain=host, client_endpoint=endpoint)
        record = base.model_copy(update={"domain": host, "client_endpoint": endpoint}).with_tokens(reply)
        await self._tokens.save(record)
        logger.info("OAuth authorization stored for portal %s (%s)", host, member_id)
        return record

    # --- robot ---------------------------------------------------------------------------------

    async def accept_robot_call(self, call: RobotCall) -> RobotAck:
        """Verify the call and journal it; the worker validates the data and does the rest.

        Only what must precede the 200 happens here (authenticity, a durable record), so a burst
        of calls is acknowledged as fast as it arrives; the data checks run in the worker, which
        the portal's rate limit paces anyway.
        """
        portal_var.set(call.auth.domain)
        workflow_var.set(call.workflow_id or "-")
        record = verify_callback(self._settings, await self._tokens.get(call.auth.member_id), call.auth)
        if not record.works:
            record = await self._heal(record, call.auth)
        job_id, created = await self._journal.add(self._new_job(call, record))
        (metrics.CALLS_ACCEPTED if created else metrics.CALLS_DUPLICATE).inc()
        if not created:
            logger.info("Robot call delivered again; job %d already has it", job_id)
            return RobotAck(status="duplicate", job_id=job_id)
        self._wake_worker()
        logger.info("Robot call accepted as job %d", job_id)
        return RobotAck(status="accepted", job_id=job_id)

    async def _heal(self, record: PortalTokens, auth: EventAuth) -> PortalTokens:
        """The authenticated call's fresh pair replaces a stored pair that no longer works."""
        if not auth.access_token or not auth.refresh_token:
            return record
        register_secret(auth.access_token, auth.refresh_token)
        now = time.time()
        changes = {
            "access_token": auth.access_token,
            "refresh_token": auth.refresh_token,
            "expires_at": expiry(auth.expires, auth.expires_in),
            "refresh_issued_at": now,
            "updated_at": now,
            "disconnected_reason": None,
        }
        try:
            # Through `amend`: the copy that said "does not work" may be behind another process
            # that has healed or refreshed the pair since (CHECK_SECONDS); a pair that works is
            # kept, or this call's pair could bring back a refresh token already spent.
            healed = await amend(self._tokens, record.member_id, changes, only_if=_not_working)
        except TokenStoreError as exc:
            # The call itself is still accepted: the next one brings another pair.
            logger.error("%s The robot call's tokens could not reconnect the portal.", exc)
            return record
        if healed is None or healed.refresh_token != auth.refresh_token:
            return healed or record  # uninstalled meanwhile, or healed by another process
        logger.info("Portal %s reconnected with the tokens of an authentic robot call", record.domain)
        return healed

    def _new_job(self, call: RobotCall, record: PortalTokens) -> NewJob:
        # The job keeps trying for as long as its workflow waits: `timeout_duration` seconds, or,
        # when it is 0 or absent (no limit), JOB_MAX_AGE_SECONDS (interface.md, "How long a job
        # keeps trying").
        waits = float(call.timeout_duration or self._settings.job_max_age_seconds)
        return NewJob(
            event_token=call.event_token,
            member_id=record.member_id,
            workflow_id=call.workflow_id,
            document_id="/".join(call.document_id),
            deadline=time.time() + waits,
            properties=call.properties,
            client_endpoint=record.client_endpoint,
            call_access_token=call.auth.access_token or "",
            # Only an explicit N skips the answer: an answer nobody waits for is dropped harmlessly,
            # a missing one leaves a workflow waiting.
            wants_answer=call.use_subscription.strip().upper() != "N",
        )

    # --- uninstall and status ------------------------------------------------------------------

    async def uninstall(self, event: UninstallEvent) -> None:
        """ONAPPUNINSTALL: forget the portal's tokens once the event is proven authentic."""
        portal_var.set(event.auth.domain)
        record = verify_callback(self._settings, await self._tokens.get(event.auth.member_id), event.auth)
        await self._tokens.delete(record.member_id)
        logger.info("App uninstalled from portal %s: its tokens are deleted", record.domain)

    async def health(self) -> Health:
        """ "ok", "degraded" or "down" with the reasons; the portals, the robot, the queue."""
        return (await self._health())[0]

    async def _health(self) -> tuple[Health, list[HealthReason]]:
        """/health, and its reasons as message keys for the status page to word in its language."""
        portals, store_error = await self._portal_statuses()
        kept = self._tokens.unsaved()
        seen = Observations(
            journal_error=await self._journal.check(),
            token_store_error=store_error,
            tokens_unsaved=[(p.domain, kept[p.member_id]) for p in portals if p.member_id in kept],
            missing_settings=self._settings.missing(),
            portals=len(portals),
            usable_portals=sum(p.connected for p in portals),
        )
        if seen.journal_error is None:
            seen.queue = await self._journal.stats()
        status, reasons = verdict(seen)
        unsaved = next((p.tokens_unsaved for p in portals if p.tokens_unsaved), None)
        health = Health(
            status=status,
            reasons=[reason_text(reason) for reason in reasons],
            portal_connected=seen.usable_portals > 0,
            robot_registered=any(p.robot_registered for p in portals),
            missing_settings=seen.missing_settings,
            token_store_error=store_error or unsaved,
            queue=seen.queue,
            cluster=await self._cluster() if self._cluster else None,
        )
        return health, reasons

    async def status_report(
        self, frame: AppFrame | None, accept_language: str | None, listen_port: int | None
    ) -> StatusReport:
        """The status page; portal details and recent runs only for a user inside that portal."""
        health, reasons = await self._health()
        settings = self._settings
        report = StatusReport(
            health=health,
            health_reasons=reasons,
            portals_installed=len((await self._portal_statuses())[0]),
            handler_url=settings.robot_handler_url,
            handler_warnings=handler_warnings(settings.app_base_url, listen_port),
            language=messages.choose(
                await self._page_language(frame), accept_language, settings.default_language
            ),
        )
        if frame is None or not await self._is_portal_frame(frame):
            return report
        await self._remember_language(frame)
        portals, _ = await self._portal_statuses()
        scheme = "https" if frame.PROTOCOL == "1" else "http"
        return report.model_copy(
            update={
                "portals": portals,
                "runs": await self._journal.recent(20),
                "verified": True,
                "portal_url": f"{scheme}://{frame.DOMAIN.lower()}",
            }
        )

    async def _page_language(self, frame: AppFrame | None) -> str | None:
        """The frame's `LANG`; else the installed portal's language, when there is one portal."""
        if frame is not None and frame.LANG:
            return frame.LANG
        try:
            portals = await self._tokens.list()
        except TokenStoreError:
            return None  # the page says so elsewhere; it still renders
        return portals[0].language if len(portals) == 1 else None

    async def _remember_language(self, frame: AppFrame) -> None:
        """A portal installed before languages were stored learns its own the first time it is opened."""
        record = await self._tokens.get(frame.member_id)
        if record is not None and record.language is None and frame.LANG:
            await amend(self._tokens, frame.member_id, {"language": frame.LANG})

    async def frame_origins(self) -> list[str]:
        """Origins that may frame the app's pages: the configured portal and the installed ones."""
        origins = set()
        if self._settings.bitrix_portal_url:
            parts = urlsplit(self._settings.bitrix_portal_url)
            origins.add(f"{parts.scheme}://{parts.netloc}".lower())
        try:
            records = await self._tokens.list()
        except TokenStoreError:
            records = []
        for record in records:
            origins.add(f"{urlsplit(record.client_endpoint).scheme}://{record.domain}".lower())
        return sorted(origins)

    async def _is_portal_frame(self, frame: AppFrame) -> bool:
        try:
            verify_callback(self._settings, await self._tokens.get(frame.member_id), frame.as_auth())
        except AppError:
            return False
        return True

    async def _portal_statuses(self) -> tuple[list[PortalStatus], str | None]:
        try:
            records = await self._tokens.list()
        except TokenStoreError as exc:
            return [], str(exc)
        unsaved = self._tokens.unsaved()
        return [_portal_status(record, unsaved.get(record.member_id)) for record in records], None

    # --- helpers -------------------------------------------------------------------------------

    def _require_configured(self) -> None:
        missing = self._settings.missing()
        if missing:
            raise NotConfigured(f"Set {', '.join(missing)} (in .env or the environment) and restart the app.")


def _not_working(record: PortalTokens) -> bool:
    return not record.works


def _not_in_time(domain: str, seconds: float) -> AppError:
    return UpstreamUnavailable(
        f"The portal {domain} did not answer within {seconds:g} s; nothing was stored. Install again "
        "once the portal answers."
    )


def _proof_failed(domain: str, what: str, exc: BitrixError) -> AppError:
    # A portal that is down or over its limit says nothing about the tokens: 502, not 403.
    if exc.retryable or not isinstance(exc, BitrixApiError | OAuthError):
        return UpstreamUnavailable(f"The portal {domain} could not be reached: {exc}")
    return InstallRejected(f"The portal {domain} {what} ({exc}).")


def _portal_status(record: PortalTokens, unsaved: str | None) -> PortalStatus:
    reason = record.disconnected_reason
    if not reason and record.refresh_expired():
        reason = "Its refresh token is over 180 days old and has expired. " + _RECONNECT
    elif not reason and not record.works:
        reason = "No usable tokens are stored. " + _RECONNECT
    age = record.refresh_age() / 86400 if record.refresh_token else None
    return PortalStatus(
        member_id=record.member_id,
        domain=record.domain,
        token_valid_for_seconds=max(0, int(record.expires_at - time.time())),
        can_refresh=portal_usable(record),
        robot_registered=record.robot_registered_at is not None,
        connected=record.works,
        disconnected_reason=reason,
        tokens_unsaved=messages.text("en", "health_tokens_unsaved", error=unsaved, domain=record.domain)
        if unsaved
        else None,
        refresh_token_age_days=age,
        refresh_token_days_left=None if age is None else max(0.0, REFRESH_TOKEN_LIFETIME / 86400 - age),
        robot_checked_at=record.robot_registered_at,
        robot_problem=record.robot_problem,
        renamed_from=record.renamed_from,
        moved_to=record.moved_to,
        move_advice=move_advice(record),
    )


def _event_changes(record: PortalTokens, event: UpdateEvent) -> dict[str, Any]:
    """The fields an event's tokens change (an event may carry none); nothing it lacks is written."""
    auth = event.auth
    register_secret(auth.access_token, auth.refresh_token)
    if not auth.access_token:
        return {}
    now = time.time()
    changes: dict[str, Any] = {
        "access_token": auth.access_token,
        "expires_at": expiry(auth.expires, auth.expires_in),
        "updated_at": now,
    }
    if auth.refresh_token:
        # A fresh refresh token makes a dead pair work again.
        changes.update(refresh_token=auth.refresh_token, refresh_issued_at=now, disconnected_reason=None)
    if auth.server_endpoint:
        changes["server_endpoint"] = auth.server_endpoint
    language = _language_id(event.data.get("LANGUAGE_ID"))
    if language:
        changes["language"] = language
    return changes


def _language_id(value: object) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None
