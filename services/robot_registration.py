"""Keeping the robot on each portal: the one place that registers it.

The install, `ONAPPUPDATE` (the portal deletes an app's robots when the app is updated:
`bizproc-robot-delete.md`, and the core's `onRestAppUpdate` in bizproc/lib/restservice.php) and the
check at start and every hour all call `ensure`: `bizproc.robot.list`, then `bizproc.robot.add`
when the list does not name the robot, else `bizproc.robot.update` (the list gives only codes, so
a definition cannot be compared; an update is cheap, and a new version of the app updates its
robot by itself).

The robot runs as the installing user (`AUTH_USER_ID`, whose token every robot call carries). The
`ONAPPINSTALL` event names that user; the frame install does not, so the user is learned with the
install's own token from `profile` (scope `basic`, any user: `api-reference/common/users/profile.md`;
"No separate scopes are needed for the methods in this section": `api-reference/common/index.md`).
`user.current` would need a `user` scope, which the app does not ask for.
"""

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any, Literal

from config import Settings
from repositories.token_store import TokenStore, TokenStoreError, amend
from services.bitrix_client import BitrixApiError, BitrixClient, BitrixError, PortalNotConnected
from services.errors import AppError, AutomationUnavailable, HandlerUrlRefused, UpstreamUnavailable
from services.observability import portal_var
from services.retry import RetryPolicy
from services.robot_definition import robot_fields

logger = logging.getLogger(__name__)

Outcome = Literal["registered", "pending"]
CHECK_INTERVAL_SECONDS = 3600.0
_ALREADY_THERE = {"ERROR_ACTIVITY_ALREADY_INSTALLED", "ERROR_ACTIVITY_ADD_FAILURE"}
_HANDLER_REFUSED = {"ERROR_WRONG_HANDLER_URL", "ERROR_UNSUPPORTED_PROTOCOL"}
# Background retries of a registration the portal could not finish: capped, then the hourly check.
_MAX_BACKGROUND_DELAY = 300.0


class RobotRegistration:
    """Registers the robot (and binds the app's events) on installed portals."""

    def __init__(
        self,
        settings: Settings,
        tokens: TokenStore,
        bitrix: BitrixClient,
        policy: RetryPolicy,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._settings = settings
        self._tokens = tokens
        self._bitrix = bitrix
        self._backoff = replace(policy, max_delay=_MAX_BACKGROUND_DELAY)
        self._sleep = sleep
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._background: set[asyncio.Task[None]] = set()  # nobody awaits these any more

    async def register_within(self, member_id: str, seconds: float, *, bind_events: bool) -> Outcome:
        """Register the robot (and bind the events); after `seconds`, go on in the background.

        Raises:
            AppError: the portal refused for good (no automation rules, a handler address it
                does not accept, ...) within `seconds`; the refusal is also stored for the status page.
        """
        task = self._start(member_id, bind_events)
        done, _ = await asyncio.wait({task}, timeout=max(seconds, 0.0))
        if not done:
            self._background.add(task)
            logger.warning(
                "The portal did not finish registering the robot within %.0f s; retrying in the background",
                seconds,
            )
            return "pending"
        task.result()
        return "registered"

    def _start(self, member_id: str, bind_events: bool) -> asyncio.Task[None]:
        previous = self._tasks.pop(member_id, None)
        if previous is not None:
            previous.cancel()  # a newer install or update supersedes it
        task = asyncio.create_task(self._until_done(member_id, bind_events), name=f"robot-{member_id}")
        self._tasks[member_id] = task
        task.add_done_callback(lambda t: self._forget(member_id, t))
        return task

    def _forget(self, member_id: str, task: asyncio.Task[None]) -> None:
        if self._tasks.get(member_id) is task:
            del self._tasks[member_id]
        background = task in self._background
        self._background.discard(task)
        error = None if task.cancelled() else task.exception()
        # Refusals were logged by ensure; a failure in the background has nobody else to tell.
        if background and isinstance(error, UpstreamUnavailable):
            logger.error("%s", error.message)

    async def _until_done(self, member_id: str, bind_events: bool) -> None:
        attempt = 0
        while True:
            try:
                await self.ensure(member_id)
                if bind_events:
                    await self._bind_events(member_id)
                return
            except BitrixError as exc:
                if not exc.retryable:
                    failure = UpstreamUnavailable(f"Registering the robot failed: {exc}. {exc.admin_hint}")
                    await self._record(member_id, problem=failure.message)
                    raise failure from exc
                delay = self._backoff.delay(attempt, exc.retry_after)
                logger.warning("Registering the robot failed (%s); retry in %.1fs", exc, delay)
                await self._sleep(delay)
                attempt += 1

    async def ensure(self, member_id: str) -> None:
        """Make sure the portal has the robot with the current definition (add or update it).

        Raises:
            AppError: the portal refused the robot for good; stored for the status page and logged.
            BitrixError: the portal could not be reached or failed for now (worth retrying).
        """
        fields = robot_fields(self._settings)
        user_id = await self._robot_user(member_id)
        if user_id:
            fields["AUTH_USER_ID"] = user_id
        try:
            await self._add_or_update(member_id, fields)
        except BitrixApiError as exc:
            refusal = self._refusal(exc)
            if refusal is None:
                raise
            await self._record(member_id, problem=refusal.message)
            logger.error("%s", refusal.message)
            raise refusal from exc
        await self._record(member_id, problem=None)

    async def _add_or_update(self, member_id: str, fields: dict[str, Any]) -> None:
        code = self._settings.robot_code
        listed = await self._bitrix.call(member_id, "bizproc.robot.list")
        if isinstance(listed, list) and code in listed:
            await self._update(member_id, code, fields)
            return
        try:
            await self._bitrix.call(member_id, "bizproc.robot.add", {"CODE": code, **fields})
        except BitrixApiError as exc:
            if exc.error.upper() not in _ALREADY_THERE:
                raise
            await self._update(member_id, code, fields)  # added meanwhile (another install)
            return
        logger.info("Robot %s registered, handler %s", code, fields["HANDLER"])

    async def _update(self, member_id: str, code: str, fields: dict[str, Any]) -> None:
        await self._bitrix.call(member_id, "bizproc.robot.update", {"CODE": code, "FIELDS": fields})
        logger.info(
            "Robot %s is registered; updated to the current definition, handler %s", code, fields["HANDLER"]
        )

    async def _robot_user(self, member_id: str) -> int | None:
        """The installing user: stored from `ONAPPINSTALL`, else asked of `profile` and stored."""
        record = await self._tokens.get(member_id)
        if record is None:
            raise PortalNotConnected(f"No tokens stored for portal {member_id}")
        if record.user_id:
            return record.user_id
        try:
            profile = await self._bitrix.call(member_id, "profile")
        except BitrixApiError as exc:
            logger.warning(
                "Could not learn the installing user (%s); the robot runs as the portal decides", exc
            )
            return None
        raw = str(profile.get("ID") or "") if isinstance(profile, dict) else ""
        if not raw.isdigit():
            return None
        await amend(self._tokens, member_id, {"user_id": int(raw)})
        return int(raw)

    async def _bind_events(self, member_id: str) -> None:
        handlers = {
            "ONAPPUNINSTALL": self._settings.uninstall_handler_url,
            "ONAPPUPDATE": self._settings.update_handler_url,
        }
        for event, handler in handlers.items():
            try:
                await self._bitrix.call(member_id, "event.bind", {"event": event, "handler": handler})
            except BitrixApiError as exc:
                if exc.error.upper() != "ERROR_HANDLER_ALREADY_EXIST":
                    logger.warning("Could not bind %s to %s: %s", event, handler, exc)

    def _refusal(self, exc: BitrixApiError) -> AppError | None:
        """The plain-words error for a refusal that no retry will change, or None."""
        code = exc.error.upper()
        if code == "ERROR_METHOD_NOT_FOUND":
            return AutomationUnavailable(
                "The portal's plan does not include automation rules: Bitrix24 answers "
                f"ERROR_METHOD_NOT_FOUND for {exc.method}, so the robot cannot be added. Switch the "
                "portal to a plan with automation rules (robots), then reinstall the app."
            )
        if code in _HANDLER_REFUSED:
            return HandlerUrlRefused(
                f"The portal refuses the robot's handler address {self._settings.robot_handler_url} "
                f"({code}): Bitrix24 accepts only an http(s) address whose host name has a dot, not "
                "localhost or a bare server name. Set APP_BASE_URL to the app's public address "
                "(for example https://robot.example.com), restart the app and reinstall it."
            )
        return None

    async def _record(self, member_id: str, problem: str | None) -> None:
        # Amended, not rewritten: the calls above (or another instance) may have rotated the tokens.
        registered = None if problem else time.time()
        await amend(self._tokens, member_id, {"robot_registered_at": registered, "robot_problem": problem})

    # --- at start and every hour, in the process that leads the job worker ----------------------

    async def keep_registered(self, interval: float = CHECK_INTERVAL_SECONDS) -> None:
        """Check every installed portal now, then every `interval` seconds, until cancelled."""
        while True:
            try:
                await self.check_all()
            except Exception:
                # The store may fail for a moment; the check must not die with it.
                logger.exception("Robot check failed; trying again in %.0f s", interval)
            await self._sleep(interval)

    async def check_all(self) -> None:
        """`ensure` on every portal with tokens; failures are logged, stored and tried next time."""
        try:
            records = await self._tokens.list()
        except TokenStoreError as exc:
            logger.error("Robot check skipped: %s", exc)
            return
        for record in records:
            if not record.access_token and not record.refresh_token:
                continue
            portal_var.set(record.domain)
            try:
                await self.ensure(record.member_id)
            except AppError:
                pass  # logged and stored by ensure
            except BitrixError as exc:
                logger.warning("Robot check for portal %s failed: %s; trying again later", record.domain, exc)

    async def close(self) -> None:
        """Cancel background registrations (shutdown); the next start checks again."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
