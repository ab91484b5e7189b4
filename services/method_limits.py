"""The portal's per-method time limit (`OPERATION_TIME_LIMIT`), tracked per portal and method.

Source: b24restdocs `limits.md`, "Resource Intensity Limits". Every reply's `time` block carries
`operating` (seconds this app spent in this method over the last 10 minutes, summed in ten
one-minute buckets) and `operating_reset_at` (when the oldest bucket drops out). Once `operating`
passes the portal's limit, the method answers 429 `OPERATION_TIME_LIMIT` until enough buckets
have dropped out; other methods keep working. The docs' advice: suspend the blocked method, retry
first at the `operating_reset_at` of the last successful reply, and if it is still blocked, wait
for the next bucket. Inside `batch` each command counts against its own method.

So: a blocked method is not called before its reset time; then one call probes it, and the others
wait for the probe's outcome. Near the limit, calls of that method are spaced out (`pace`).
"""

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

# The docs' example of the cloud limit; the real one is set by the portal's configuration, so a
# block teaches us a lower figure when `operating` was below this when it came.
DEFAULT_LIMIT_SECONDS = 480.0
NEXT_BUCKET_SECONDS = 60.0  # buckets are one minute long: the next one drops out within a minute
PROBE_WAIT_SECONDS = 10.0  # how long the others wait for a probe in flight before asking again
SLOW_DOWN_SHARE = 0.8  # of the limit: from here on, calls of the method are spaced out
MAX_PACE_SECONDS = 2.0


@dataclass
class _Budget:
    operating: float = 0.0
    reset_at: float = 0.0
    blocked_until: float = 0.0
    probing: bool = False


@dataclass(frozen=True)
class Blocked:
    """A method that must not be called now, and when to ask again."""

    method: str
    until: float


class MethodLimits:
    """What the portals told us about each method's time budget (one worker process holds it)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._budgets: dict[tuple[str, str], _Budget] = {}
        self._limit = DEFAULT_LIMIT_SECONDS

    def _budget(self, member_id: str, method: str) -> _Budget:
        return self._budgets.setdefault((member_id, method.lower()), _Budget())

    def observe(self, member_id: str, method: str, block: Any) -> None:
        """Read a reply's `time` block: the method answered, so it is not blocked (any more)."""
        budget = self._budget(member_id, method)
        if budget.blocked_until:
            logger.info("%s is available again after its time limit", method)
        budget.blocked_until, budget.probing = 0.0, False
        if not isinstance(block, Mapping):
            return
        operating, reset_at = block.get("operating"), block.get("operating_reset_at")
        if isinstance(operating, int | float) and not isinstance(operating, bool):
            budget.operating = float(operating)
        if isinstance(reset_at, int | float) and not isinstance(reset_at, bool):
            budget.reset_at = float(reset_at)

    def check(self, member_id: str, method: str) -> Blocked | None:
        """None when `method` may be called now (the caller may be its one probe), else until when not."""
        budget = self._budgets.get((member_id, method.lower()))
        if budget is None or not budget.blocked_until:
            return None
        now = self._clock()
        if now < budget.blocked_until:
            return Blocked(method, budget.blocked_until)
        if budget.probing:
            return Blocked(method, now + PROBE_WAIT_SECONDS)
        budget.probing = True
        return None

    def settle(self, member_id: str, method: str) -> None:
        """A probe ended without an answer either way (a network error): let the next call probe."""
        budget = self._budgets.get((member_id, method.lower()))
        if budget is not None:
            budget.probing = False

    def block(self, member_id: str, method: str) -> float:
        """The portal said OPERATION_TIME_LIMIT: suspend the method; returns when to try again."""
        budget = self._budget(member_id, method)
        now = self._clock()
        if budget.blocked_until > now and not budget.probing:
            return budget.blocked_until  # known already (another command of the same batch)
        if budget.operating > 0:
            self._limit = min(self._limit, budget.operating)
        # First retry at the last reply's reset time; a probe that is refused waits for the next bucket.
        first = budget.reset_at > now and not budget.probing and not budget.blocked_until
        budget.blocked_until = budget.reset_at if first else now + NEXT_BUCKET_SECONDS
        budget.probing = False
        logger.warning(
            "%s is blocked by the portal's time limit (OPERATION_TIME_LIMIT) for %.0f s; other methods go on",
            method,
            budget.blocked_until - now,
        )
        return budget.blocked_until

    def pace(self, member_id: str, method: str) -> float:
        """Seconds to wait before calling `method`: zero until its use nears the limit."""
        budget = self._budgets.get((member_id, method.lower()))
        if budget is None or budget.reset_at <= self._clock():
            return 0.0
        share = budget.operating / self._limit
        if share < SLOW_DOWN_SHARE:
            return 0.0
        return min(1.0, (share - SLOW_DOWN_SHARE) / (1 - SLOW_DOWN_SHARE)) * MAX_PACE_SECONDS

    def blocked_methods(self, member_id: str) -> dict[str, float]:
        """Methods of a portal blocked right now, with the time they may be tried again."""
        now = self._clock()
        return {
            method: budget.blocked_until
            for (member, method), budget in self._budgets.items()
            if member == member_id and budget.blocked_until > now
        }
