"""RetryPolicy: which failures are retried, and how long to wait before the next try."""

import pytest

from services.bitrix_client import (
    BitrixAccessDenied,
    BitrixApiError,
    BitrixAuthError,
    BitrixError,
    BitrixRateLimitError,
    BitrixServerError,
    BitrixTokenExpired,
    BitrixTransportError,
    OAuthInvalidGrant,
    PortalNotConnected,
)
from services.retry import RetryPolicy


def _policy(
    rand: float = 0.0, *, max_attempts: int = 3, base_delay: float = 0.5, max_delay: float = 8.0
) -> RetryPolicy:
    return RetryPolicy(
        max_attempts=max_attempts, base_delay=base_delay, max_delay=max_delay, rand=lambda: rand
    )


@pytest.mark.parametrize(
    "exc",
    [
        BitrixTransportError("connect failed"),
        BitrixRateLimitError(503, "QUERY_LIMIT_EXCEEDED", "Too many requests", "crm.contact.add"),
        BitrixServerError(500, "INTERNAL_SERVER_ERROR", "Internal server error", "crm.contact.add"),
    ],
)
def test_transient_failures_are_retried_within_budget(exc: BitrixError) -> None:
    assert _policy().should_retry(exc, attempt=0)


@pytest.mark.parametrize(
    "exc",
    [
        BitrixApiError(400, "", "Parameter 'fields' must be array.", "crm.contact.add"),
        BitrixAuthError(401, "NO_AUTH_FOUND", "Wrong authorization data", "crm.contact.add"),
        BitrixTokenExpired(401, "expired_token", "The access token provided has expired", "x"),
        BitrixAccessDenied(403, "ACCESS_DENIED", "Access denied!", "bizproc.event.send"),
        OAuthInvalidGrant(400, "invalid_grant", ""),
        PortalNotConnected("no tokens"),
        ValueError("not ours at all"),
    ],
)
def test_permanent_failures_are_never_retried(exc: BaseException) -> None:
    assert not _policy().should_retry(exc, attempt=0)


def test_retries_stop_when_attempts_are_used_up() -> None:
    policy = _policy(max_attempts=3)
    exc = BitrixTransportError("reset")

    assert [policy.should_retry(exc, attempt) for attempt in range(4)] == [True, True, False, False]


def test_delay_grows_exponentially_from_the_base_with_rand_one() -> None:
    policy = _policy(rand=1.0, base_delay=0.5, max_delay=100.0)

    assert [policy.delay(attempt) for attempt in range(4)] == [0.5, 1.0, 2.0, 4.0]


def test_jitter_halves_the_delay_at_most() -> None:
    low, high = _policy(rand=0.0), _policy(rand=1.0)

    assert low.delay(2) == pytest.approx(high.delay(2) / 2)
    assert low.delay(2) == pytest.approx(1.0)
    assert high.delay(2) == pytest.approx(2.0)


def test_delay_is_capped_even_after_many_attempts() -> None:
    policy = _policy(rand=1.0, max_delay=8.0)

    assert policy.delay(30) == 8.0


def test_retry_after_wins_over_backoff() -> None:
    assert _policy(rand=1.0).delay(0, retry_after=3.0) == 3.0


def test_retry_after_is_capped_at_the_maximum_delay() -> None:
    assert _policy(max_delay=8.0).delay(0, retry_after=3600.0) == 8.0


@pytest.mark.parametrize("hint", [-5.0, float("nan")])
def test_nonsense_retry_after_never_gives_a_negative_or_nan_delay(hint: float) -> None:
    delay = _policy(rand=0.0).delay(0, retry_after=hint)

    assert 0.0 <= delay <= 8.0
