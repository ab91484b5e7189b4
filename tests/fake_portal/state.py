"""Portal state: configuration, errors, tokens and grants, queued failures, rate limits."""

from __future__ import annotations

import math
import secrets
import string
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

SCOPE = "crm,bizproc"
# The token response names the authorization server, not the portal (wire doc 2.5); apps that
# mistake it for the portal address must break against this fake just as they would in production.
OAUTH_DOMAIN = "oauth.bitrix.info"


# --------------------------------------------------------------------------------------------
# Configuration and internal records
# --------------------------------------------------------------------------------------------


@dataclass
class FakePortalConfig:
    client_id: str = "local.test0000000000.00000000"
    client_secret: str = "test-client-secret-0000000000000000000000000000"
    member_id: str = "a223c6b3710f85df22e9377d6c4f7553"  # 32 hex
    access_ttl: float = 3600.0  # seconds an access token lives
    # A refresh token lives 180 days from its issue, then the server answers invalid_grant
    # (b24restdocs settings/oauth/auto-renewal.md: "The lifetime of `refresh_token` is 180 days").
    refresh_ttl: float = 180 * 86400.0
    code_ttl: float = 30.0
    strict_refresh: bool = True  # an old refresh token dies when rotated
    rate_burst: int | None = 50  # leaky bucket X; None disables rate limiting
    rate_drain: float = 2.0  # leaky bucket Y per second
    redirect_uri: str = "http://127.0.0.1:8000/app"  # where /oauth/authorize/ redirects
    admin_user_id: int = 1
    # The portal's language: `data[LANGUAGE_ID]` of ONAPPINSTALL and `LANG` of the frame (wire doc
    # 1.2, 1.4); real portals send `ru`, `en`, `de`, ...
    language: str = "en"
    # Per-method time limit (limits.md, "Resource Intensity Limits"): seconds of `operating` per
    # method in a sliding window of ten buckets; None = no limit (the on-premise default).
    operating_limit: float | None = None
    operating_window: float = 600.0  # 10 one-minute buckets; tests shrink it
    operating_costs: dict[str, float] = field(default_factory=dict)  # seconds a call costs; else real time
    # The public address the portal claims (`https://b24-x.bitrix24.ru`) while it listens on 127.0.0.1;
    # tests route that host to `bound_url` at the transport. None: the 127.0.0.1 address itself.
    public_url: str | None = None
    # The authorization server of the portal's region (`https://oauth.bitrix24.tech` for ru, by, kz,
    # uz, am, az, ge, kg; `https://oauth.bitrix.info` otherwise; settings/oauth/index.md). None: this
    # same server answers /oauth/token/ at the portal's own address, as before.
    oauth_url: str | None = None
    # Automation rules on the portal's plan. Without them the core does not register
    # bizproc.robot.* (nor bizproc.event.send and bizproc.activity.log when business processes
    # are off too), so calling them gives ERROR_METHOD_NOT_FOUND: bizproc/lib/restservice.php,
    # onRestServiceBuildDescription(), which maps these methods only when
    # Feature::isFeatureEnabled('bizproc' | 'crm_automation_deal' | ...) says so.
    automation_rules: bool = True


# Error replies a portal gives for its app's authorization and permissions, by code: (HTTP status,
# error_description). Sources: `_includes/system-errors.md` (INVALID_CREDENTIALS, ACCESS_DENIED,
# insufficient_scope, OPERATION_TIME_LIMIT); `api-reference/widgets/placement-bind.md`
# (WRONG_AUTH_TYPE); `api-reference/scopes/confirmation.md` (METHOD_CONFIRM_*);
# `settings/cloud-and-on-premise/on-premise/custom-auth-provider.md` (authorization_error,
# ERROR_OAUTH "Application not installed"); `settings/oauth/error-codes.md` (PAYMENT_REQUIRED; on
# REST the core's CRestServer::STATUS_PAYMENT_REQUIRED is 402). APPLICATION_NOT_FOUND is named by
# issue #9 without a documented reply: 401, like the core's other authorization failures.
PORTAL_ERRORS: dict[str, tuple[int, str]] = {
    "WRONG_AUTH_TYPE": (403, "Current authorization type is denied for this method"),
    "INVALID_CREDENTIALS": (403, "Invalid request credentials"),
    "authorization_error": (401, "Unable to authorize user"),
    "ERROR_OAUTH": (401, "Application not installed"),
    "APPLICATION_NOT_FOUND": (401, "Application not found"),
    "METHOD_CONFIRM_WAITING": (401, "Waiting for confirmation"),
    "METHOD_CONFIRM_DENIED": (403, "Method call denied"),
    "PAYMENT_REQUIRED": (402, "Payment required"),
    "insufficient_scope": (403, "The request requires higher privileges than provided by the webhook token"),
    "ACCESS_DENIED": (403, "REST API is available only on commercial plans"),
    "OPERATION_TIME_LIMIT": (429, "Method is blocked due to operation time limit."),
}


class PortalError(Exception):
    """A Bitrix24 error envelope plus its HTTP status."""

    def __init__(self, status: int, error: str, description: str) -> None:
        super().__init__(f"{status} {error!r}: {description}")
        self.status = status
        self.error = error
        self.description = description

    def body(self) -> dict[str, str]:
        return {"error": self.error, "error_description": self.description}


@dataclass
class _Grant:
    user_id: int
    expires_at: float  # unix time


@dataclass(frozen=True)
class _TokenPair:
    access_token: str
    refresh_token: str
    expires: int
    user_id: int


@dataclass
class _Failure:
    status: int
    error: str
    description: str
    times: int


@dataclass
class _LateReply:
    """A slow request: the reply comes `delay` seconds late, or as a 5xx; with `slow_work` the
    work itself happens only after the delay (the portal still runs it when the client gave up)."""

    delay: float
    status: int | None
    times: int
    slow_work: bool = False


# What a real portal's robot calls carry in `timeout_duration` (wire doc 6.3 captures 660;
# interface.md "How long a job keeps trying": 0 or absent means the workflow waits without limit).
# Calls cycle through them unless a test asks for one.
TIMEOUT_DURATIONS: tuple[int | None, ...] = (0, None, 660, 86400)
VARIED = -1  # robot_call_body's default: the next of TIMEOUT_DURATIONS


@dataclass
class _ListResult:
    """A list-method answer: the envelope also carries ``total`` and ``next`` (wire doc 3.3)."""

    items: list[dict[str, Any]]
    total: int
    next: int | None


class _LeakyBucket:
    """Per-portal leaky bucket (wire doc 4.1): +1 per HTTP request, drains `drain` per second."""

    def __init__(self, burst: int | None, drain: float) -> None:
        self.burst = burst
        self.drain = drain
        self.level = 0.0
        self.stamp = time.monotonic()

    def allow(self) -> bool:
        now = time.monotonic()
        self.level = max(0.0, self.level - (now - self.stamp) * self.drain)
        self.stamp = now
        if self.burst is None:
            return True
        if self.level + 1 > self.burst:
            return False  # rejected requests do not fill the bucket further
        self.level += 1
        return True


def _new_stats() -> dict[str, Any]:
    return {
        "rest_requests": 0,
        "rest_commands": 0,
        "batches": 0,
        "refreshes": 0,
        "code_exchanges": 0,
        "rate_limited": 0,
        "token_requests": 0,
        "errors": 0,
        "held_requests": 0,
        "per_method": {},
    }


def _random_token() -> str:
    # Real tokens are ~70 hex chars; apps must not assume 32 (wire doc 6.2).
    return secrets.token_hex(35)


def _digits(count: int) -> str:
    return "".join(secrets.choice(string.digits) for _ in range(count))


def _new_workflow_id() -> str:
    return f"{secrets.token_hex(7)}.{_digits(8)}"  # PHP uniqid('', true) shape


def _new_event_token(workflow_id: str) -> str:
    activity = "A" + "_".join(_digits(5) for _ in range(4))
    alphabet = string.ascii_letters + string.digits
    salt = "".join(secrets.choice(alphabet) for _ in range(32))
    return f"{workflow_id}|{activity}|{salt}.{secrets.token_hex(32)}"


class _State:
    """Everything the server thread mutates and the test thread reads; guard with ``lock``."""

    def __init__(self, config: FakePortalConfig) -> None:
        self.config = config
        self.lock = threading.RLock()
        self.url = ""
        self.app_token = secrets.token_hex(16)
        self.access: dict[str, _Grant] = {}
        self.refresh: dict[str, _Grant] = {}
        self.codes: dict[str, _Grant] = {}
        self.contacts: list[dict[str, Any]] = []
        # The match codes of the contacts' phones and e-mails, kept up to date on every save as the
        # portal keeps its duplicate index (crm/lib/integrity DuplicateCommunicationMatchCodeTable,
        # b_crm_dp_comm_mcd) that crm.duplicate.findbycomm reads: kind -> code -> contact ids.
        self.comm_index: dict[str, dict[str, set[int]]] = {"PHONE": {}, "EMAIL": {}}
        self.comm_codes: dict[tuple[str, int], set[str]] = {}  # (kind, contact id) -> its codes
        self.contact_meta: dict[int, dict[str, Any]] = {}
        self.issued: set[str] = set()  # event tokens this portal signed
        self.pending: set[str] = set()  # ... whose robot still waits for its answer
        self.answers: dict[str, dict[str, Any]] = {}
        self.dropped: list[dict[str, Any]] = []  # answers accepted with `true`, then ignored
        self.held_methods: set[str] = set()
        self.activity_log: list[dict[str, str]] = []
        self.robots: dict[str, dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self.failures: dict[str, deque[_Failure]] = {}
        self.late_replies: dict[str, deque[_LateReply]] = {}
        self.timeouts = 0  # robot calls made, to cycle through TIMEOUT_DURATIONS
        self.stats = _new_stats()
        self.recent_errors: deque[str] = deque(maxlen=20)
        self.bucket = _LeakyBucket(config.rate_burst, config.rate_drain)
        self.operating: dict[str, list[list[float]]] = {}  # method -> [[bucket start, seconds], ...]
        self.moved: dict[str, str] = {}  # old host -> new base URL, after a rename
        self.token_hosts: list[str] = []  # the Host of every /oauth/token/ request

    # -- per-method time limit (limits.md, "Resource Intensity Limits") ---------------------

    def _buckets(self, method: str, now: float) -> list[list[float]]:
        window = self.config.operating_window
        # A bucket counts for `window` seconds from the first call recorded in it.
        live = [b for b in self.operating.get(method, []) if b[0] + window > now]
        self.operating[method] = live
        return live

    def check_operating(self, method: str) -> None:
        """Checked before each call: a method whose summed time passed the limit is refused."""
        limit = self.config.operating_limit
        if limit is not None and sum(b[1] for b in self._buckets(method, time.time())) > limit:
            status, description = PORTAL_ERRORS["OPERATION_TIME_LIMIT"]
            raise PortalError(status, "OPERATION_TIME_LIMIT", description)

    def charge_operating(self, method: str, seconds: float) -> None:
        now = time.time()
        buckets = self._buckets(method, now)
        cost = self.config.operating_costs.get(method, seconds)
        if not buckets or now - buckets[-1][0] >= self.config.operating_window / 10:
            buckets.append([now, 0.0])  # a new one-minute bucket starts with its first call
        buckets[-1][1] += cost

    def operating_figures(self, method: str) -> dict[str, Any]:
        now = time.time()
        buckets = self._buckets(method, now)
        oldest = buckets[0][0] if buckets else now
        return {
            # Whole seconds as the portal sends them, rounded up: at that time the bucket is gone.
            "operating_reset_at": math.ceil(oldest + self.config.operating_window),
            "operating": sum(b[1] for b in buckets),
        }

    # -- tokens --------------------------------------------------------------------------

    def issue_tokens(self, user_id: int) -> _TokenPair:
        access, refresh = _random_token(), _random_token()
        expires_at = time.time() + self.config.access_ttl
        with self.lock:
            self.access[access] = _Grant(user_id, expires_at)
            self.refresh[refresh] = _Grant(user_id, time.time() + self.config.refresh_ttl)
        return _TokenPair(access, refresh, int(expires_at), user_id)

    def user_for(self, token: str | None) -> int:
        grant = self.access.get(token) if token else None
        if grant is None:
            raise PortalError(401, "NO_AUTH_FOUND", "Wrong authorization data")
        if time.time() >= grant.expires_at:
            raise PortalError(401, "expired_token", "The access token provided has expired")
        return grant.user_id

    def consume_code(self, code: str) -> int:
        grant = self.codes.pop(code, None)  # single use, even when it turns out to be expired
        if grant is None or time.time() >= grant.expires_at:
            raise PortalError(400, "invalid_grant", "Invalid or expired authorization code")
        return grant.user_id

    def rotate_refresh(self, refresh_token: str) -> int:
        grant = self.refresh.get(refresh_token)
        if grant is None or time.time() >= grant.expires_at:
            raise PortalError(400, "invalid_grant", "Invalid refresh token")
        if self.config.strict_refresh:
            del self.refresh[refresh_token]
        return grant.user_id

    def refresh_alive(self, refresh_token: str | None) -> bool:
        grant = self.refresh.get(refresh_token or "")
        return grant is not None and time.time() < grant.expires_at

    def revoke_all(self) -> None:
        self.access.clear()
        self.refresh.clear()
        self.codes.clear()

    # -- failures and bookkeeping --------------------------------------------------------

    def take_failure(self, method: str) -> PortalError | None:
        queue = self.failures.get(method)
        if not queue:
            return None
        rule = queue[0]
        rule.times -= 1
        if rule.times <= 0:
            queue.popleft()
        return PortalError(rule.status, rule.error, rule.description)

    def take_late_reply(self, method: str) -> _LateReply | None:
        queue = self.late_replies.get(method)
        if not queue:
            return None
        rule = queue[0]
        rule.times -= 1
        if rule.times <= 0:
            queue.popleft()
        return rule

    def count_method(self, method: str) -> None:
        per_method: dict[str, int] = self.stats["per_method"]
        per_method[method] = per_method.get(method, 0) + 1

    def note_error(self, where: str, error: PortalError) -> None:
        self.stats["errors"] += 1
        self.recent_errors.append(f"{where}: {error.status} {error.error!r} {error.description}")

    @property
    def server_endpoint(self) -> str:
        return (self.config.oauth_url or self.url) + "/rest/"

    def token_response(self, pair: _TokenPair) -> dict[str, Any]:
        # Key order as the real server sends it (issue #285, wire doc 2.5).
        # `client_endpoint` is the portal's current address, also after a rename (wire doc 2.5).
        return {
            "access_token": pair.access_token,
            "expires": pair.expires,
            "expires_in": int(self.config.access_ttl),
            "scope": SCOPE,
            "domain": urlsplit(self.config.oauth_url).netloc if self.config.oauth_url else OAUTH_DOMAIN,
            "server_endpoint": self.server_endpoint,
            "status": "L",
            "client_endpoint": self.url + "/rest/",
            "member_id": self.config.member_id,
            "user_id": pair.user_id,
            "refresh_token": pair.refresh_token,
        }
