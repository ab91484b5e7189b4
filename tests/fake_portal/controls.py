"""FakePortal's controls (expire, fail, hold, rate limit) and thread-safe inspection snapshots."""

from __future__ import annotations

import copy
import threading
import time
from collections import deque
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from tests.fake_portal.batch import _method_name
from tests.fake_portal.methods_app import _Call
from tests.fake_portal.methods_crm import _contact_add
from tests.fake_portal.state import (
    PORTAL_ERRORS,
    FakePortalConfig,
    _Failure,
    _LateReply,
    _LeakyBucket,
    _State,
)


class _PortalControls:
    """FakePortal's controls and inspection snapshots."""

    if TYPE_CHECKING:  # provided by FakePortal
        config: FakePortalConfig
        _state: _State
        _released: threading.Event
        _replies_released: threading.Event

    # -- controls ------------------------------------------------------------------------------

    def refresh_token_alive(self, refresh_token: str | None) -> bool:
        """Whether the authorization server would still take this refresh token."""
        with self._state.lock:
            return self._state.refresh_alive(refresh_token)

    def expire_access_tokens(self) -> None:
        cutoff = time.time() - 1
        with self._state.lock:
            for grant in self._state.access.values():
                grant.expires_at = min(grant.expires_at, cutoff)

    def fail_next(self, method: str, status: int, error: str, description: str, times: int = 1) -> None:
        """The next `times` calls of `method` ("oauth.token", "batch", any REST method) fail."""
        name = method if method == "oauth.token" else _method_name(method)
        with self._state.lock:
            queue = self._state.failures.setdefault(name, deque())
            queue.append(_Failure(status, error, description, times))

    def reply_late(
        self,
        method: str,
        *,
        delay: float = 0.0,
        status: int | None = None,
        times: int = 1,
        slow_work: bool = False,
    ) -> None:
        """The next `times` requests of `method` run and commit, then the reply is lost.

        It comes `delay` seconds late (past the app's HTTP timeout), or as a gateway error
        `status` (502/504) with no Bitrix envelope. With `slow_work` the request runs (and
        commits) only after the delay. A real portal does this: PHP keeps running after the
        client or the gateway gave up (the request limit is time-based, see b24restdocs
        `limits.md`, "operating"), so a lost reply says nothing about the work.
        """
        with self._state.lock:
            queue = self._state.late_replies.setdefault(_method_name(method), deque())
            queue.append(_LateReply(delay, status, times, slow_work))

    def clear_failures(self) -> None:
        """Forget every pending `fail_next` and `reply_late`: the portal is healthy again."""
        with self._state.lock:
            self._state.failures.clear()
            self._state.late_replies.clear()

    def hold(self, *, replies: bool = False, after: int = 0) -> None:
        """Stall REST requests before they run; with `replies`, after they ran but before the reply.

        Holding replies models a portal that did the work while the app died waiting for the answer.
        `after` lets that many more REST requests be answered first (say, a search before an add).
        """
        with self._state.lock:
            self._replies_to_pass = after if replies else 0
        (self._replies_released if replies else self._released).clear()

    def set_robot_properties(self, code: str, properties: Mapping[str, Any]) -> None:
        """The robot's inputs as an earlier version of the app registered them."""
        with self._state.lock:
            self._state.robots[code]["PROPERTIES"] = copy.deepcopy(dict(properties))

    def add_contact(self, fields: Mapping[str, Any], user_id: int | None = None) -> int:
        """A contact that was in the CRM before the test, made as crm.contact.add makes it."""
        with self._state.lock:
            user = self.config.admin_user_id if user_id is None else user_id
            result: int = _contact_add(_Call(self._state, user, {"fields": dict(fields)}))
            return result

    def hold_method(self, *methods: str) -> None:
        """Stall the REST calls of these methods only (a portal that hangs on them)."""
        with self._state.lock:
            self._state.held_methods.update(_method_name(m) for m in methods)

    def release(self) -> None:
        with self._state.lock:
            self._state.held_methods.clear()
        self._released.set()
        self._replies_released.set()

    def delete_robots(self) -> None:
        """The robots disappear, as after an app update the app was not told about."""
        with self._state.lock:
            self._state.robots.clear()

    def set_rate_limit(self, burst: int | None, drain: float) -> None:
        with self._state.lock:
            self._state.bucket = _LeakyBucket(burst, drain)

    @property
    def application_token(self) -> str:
        with self._state.lock:
            return self._state.app_token

    # -- inspection (snapshots) ------------------------------------------------------------------

    @property
    def contacts(self) -> list[dict[str, Any]]:
        with self._state.lock:
            return copy.deepcopy(self._state.contacts)

    @property
    def answers(self) -> dict[str, dict[str, Any]]:
        with self._state.lock:
            return copy.deepcopy(self._state.answers)

    @property
    def robots(self) -> dict[str, dict[str, Any]]:
        with self._state.lock:
            return copy.deepcopy(self._state.robots)

    @property
    def bound_events(self) -> list[dict[str, Any]]:
        with self._state.lock:
            return copy.deepcopy(self._state.events)

    @property
    def dropped_answers(self) -> list[dict[str, Any]]:
        """Answers `bizproc.event.send` accepted (`true`) for a robot that no longer waited."""
        with self._state.lock:
            return copy.deepcopy(self._state.dropped)

    @property
    def pending_event_tokens(self) -> set[str]:
        with self._state.lock:
            return set(self._state.pending)

    @property
    def activity_log(self) -> list[dict[str, str]]:
        with self._state.lock:
            return copy.deepcopy(self._state.activity_log)

    @property
    def recent_errors(self) -> list[str]:
        with self._state.lock:
            return list(self._state.recent_errors)

    @property
    def token_hosts(self) -> list[str]:
        """The Host header of every token request, in order."""
        with self._state.lock:
            return list(self._state.token_hosts)

    def fail_with(self, method: str, code: str, times: int = 1) -> None:
        """The next `times` calls of `method` get the portal's documented reply for `code` (PORTAL_ERRORS)."""
        status, description = PORTAL_ERRORS[code]
        self.fail_next(method, status, code, description, times)

    @property
    def stats(self) -> dict[str, Any]:
        with self._state.lock:
            return copy.deepcopy(self._state.stats)

    def counts(self) -> dict[str, int]:
        """How many of each the portal holds, without copying them: the benchmarks poll this every
        20 ms, and copying thousands of contacts and answers under the lock held up the REST calls."""
        with self._state.lock:
            state = self._state
            return {
                "contacts": len(state.contacts),
                "answers": len(state.answers),
                "robots": len(state.robots),
                "bound_events": len(state.events),
                "pending": len(state.pending),
            }

    def wait_for_answers(self, n: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with self._state.lock:
                if len(self._state.answers) >= n:
                    return
            if time.monotonic() >= deadline:
                raise AssertionError(self._answers_timeout_message(n, timeout))
            time.sleep(0.01)

    def _answers_timeout_message(self, n: int, timeout: float) -> str:
        with self._state.lock:
            state = self._state
            return (
                f"expected {n} bizproc.event.send answers within {timeout}s, got "
                f"{len(state.answers)}; still waiting on {len(state.pending)} event tokens; "
                f"contacts={len(state.contacts)} per_method={state.stats['per_method']} "
                f"recent_errors={list(state.recent_errors)}"
            )
