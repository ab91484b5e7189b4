"""The one retry policy: which failures are worth another try, and how long to wait first.

The client uses it for quick in-request retries; the job worker uses the same numbers to
reschedule a job in the journal, so a retry survives a restart.
"""

import math
import random
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    """Capped exponential backoff with jitter."""

    max_attempts: int = 3
    base_delay: float = 0.5
    max_delay: float = 8.0
    rand: Callable[[], float] = random.random

    def should_retry(self, exc: BaseException, attempt: int) -> bool:
        """Retry only transient failures (network, rate limit, 5xx), and only `max_attempts` times."""
        return bool(getattr(exc, "retryable", False)) and attempt + 1 < self.max_attempts

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before try `attempt + 1`: the server's hint wins when it gives one."""
        if retry_after is not None and not math.isnan(retry_after):
            return min(max(retry_after, 0.0), self.max_delay)
        ceiling = min(self.max_delay, self.base_delay * 2**attempt)
        # Jitter spreads out the workers that all hit the limit at the same moment.
        return float(ceiling * (0.5 + self.rand() / 2))
