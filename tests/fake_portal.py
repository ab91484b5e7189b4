"""A fake Bitrix24 portal plus OAuth authorization server, served over real HTTP.

End-to-end tests and the benchmark talk to it exactly as the app talks to a cloud portal, so
every wire format here follows `/work/shared/bitrix24-wire.md` (sections cited inline).

Two ways to use it:

* in-process: ``with FakePortal(cfg) as portal: ...`` runs uvicorn in a daemon thread on a
  free 127.0.0.1 port; inspection properties are thread-safe snapshots.
* out-of-process: ``python -m tests.fake_portal --port 8100`` and drive it through the JSON
  control API under ``/_fake/`` (see ``_ControlApi``).

The portal never POSTs to the app by itself: tests ask it for the bodies it would send
(``install_event_body``, ``robot_call_body``, ...) and deliver them, which keeps timing explicit.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import html
import json
import math
import re
import secrets
import signal
import socket
import string
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from email import policy
from email.parser import BytesParser
from types import FrameType, TracebackType
from typing import Any
from urllib.parse import parse_qsl, quote_plus, urlencode, urlsplit

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

SCOPE = "crm,bizproc"
# The token response names the authorization server, not the portal (wire doc 2.5); apps that
# mistake it for the portal address must break against this fake just as they would in production.
OAUTH_DOMAIN = "oauth.bitrix.info"
PAGE_SIZE = 50  # list methods (wire doc 3.3)
MAX_BATCH = 50  # batch commands (wire doc 4.3)

_CODE_RE = re.compile(r"[A-Za-z0-9._-]+")
_PROPERTY_KEY_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_EMAIL_RE = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
_BRACKET_RE = re.compile(r"\[([^\]]*)\]")
# The core's batch reference (`CRestUtil::processBatchElement`, rest/classes/general/rest_util.php):
# `$` + one of the batch's result arrays, case-insensitive, then any non-space text as the path.
_BATCH_REF_RE = re.compile(r"\$(result|next|total|time|error)([^\s]*)", re.IGNORECASE)
_BATCH_KEY_RE = re.compile(r"\$()([^\s]*)", re.IGNORECASE)  # keys: `$keysCache` is '' for them
_PATH_RE = re.compile(r"\[([^\]]+)\]")
_MULTIFIELDS = ("PHONE", "EMAIL", "WEB", "IM")
_CONTACT_KEYS = (
    "HONORIFIC", "NAME", "SECOND_NAME", "LAST_NAME", "PHOTO", "LEAD_ID", "TYPE_ID", "SOURCE_ID",
    "SOURCE_DESCRIPTION", "POST", "COMMENTS", "COMPANY_ID", "BIRTHDATE", "EXPORT", "HAS_PHONE",
    "HAS_EMAIL", "HAS_IMOL", "DATE_CREATE", "DATE_MODIFY", "ASSIGNED_BY_ID", "CREATED_BY_ID",
    "MODIFY_BY_ID", "OPENED", "ORIGINATOR_ID", "ORIGIN_ID", "ORIGIN_VERSION", "FACE_ID",
    "LAST_ACTIVITY_TIME", "LAST_ACTIVITY_BY",
)  # fmt: skip


# --------------------------------------------------------------------------------------------
# PHP query-string conventions (wire doc 1.2, 3.2, 6.3)
# --------------------------------------------------------------------------------------------


def parse_php_query(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Rebuild PHP bracket keys (``a[b][0]=x``) into nested dicts; 0..n-keyed nodes become lists."""
    root: dict[str, Any] = {}
    for key, value in pairs:
        _assign(root, _split_key(key), value)
    listified: dict[str, Any] = {key: _listify(value) for key, value in root.items()}
    return listified


def _split_key(key: str) -> list[str]:
    head, bracket, rest = key.partition("[")
    if not bracket or not head:
        return [key]
    return [head, *_BRACKET_RE.findall("[" + rest)]


def _assign(node: dict[str, Any], path: list[str], value: str) -> None:
    *parents, last = path
    for part in parents:
        key = part or _next_index(node)  # PHP: `a[]` appends
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[last or _next_index(node)] = value


def _next_index(node: Mapping[str, Any]) -> str:
    numbers = [int(key) for key in node if key.isdigit()]
    return str(max(numbers) + 1 if numbers else 0)


def _listify(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    items = {key: _listify(value) for key, value in node.items()}
    if items and set(items) == {str(index) for index in range(len(items))}:
        return [items[str(index)] for index in range(len(items))]
    return items


def build_php_query(data: Mapping[str, Any] | Sequence[tuple[str, Any]]) -> str:
    """Encode like PHP ``http_build_query``: brackets as %5B/%5D, ``+`` for spaces, no nulls."""
    pairs: list[tuple[str, str]] = []
    items = data.items() if isinstance(data, Mapping) else data
    for key, value in items:
        _flatten(str(key), value, pairs)
    return "&".join(f"{_php_urlencode(key)}={_php_urlencode(value)}" for key, value in pairs)


def _flatten(prefix: str, value: Any, out: list[tuple[str, str]]) -> None:
    if value is None:
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            _flatten(f"{prefix}[{key}]", item, out)
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _flatten(f"{prefix}[{index}]", item, out)
    elif isinstance(value, bool):
        out.append((prefix, "1" if value else "0"))  # PHP casts booleans this way
    else:
        out.append((prefix, str(value)))


def _php_urlencode(text: str) -> str:
    # PHP's urlencode() also escapes "~", which quote_plus leaves alone.
    return quote_plus(text, safe="").replace("~", "%7E")


def php_array(entries: Mapping[str, Any]) -> Any:
    """PHP ``json_encode`` of an array: a list when empty or 0..n-keyed, else an object."""
    if list(entries) == [str(index) for index in range(len(entries))]:
        return list(entries.values())
    return dict(entries)


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


# --------------------------------------------------------------------------------------------
# REST methods: each takes a _Call and returns the `result` value or raises PortalError
# --------------------------------------------------------------------------------------------


@dataclass
class _Call:
    state: _State
    user_id: int
    params: dict[str, Any]  # top-level keys already lower-cased (wire doc 3.2)

    def param(self, name: str) -> Any:
        return self.params.get(name.lower())

    @property
    def is_admin(self) -> bool:
        return self.user_id == self.state.config.admin_user_id


def _validation(description: str) -> PortalError:
    return PortalError(400, "ERROR_ACTIVITY_VALIDATION_FAILURE", description)


def _require_admin(call: _Call) -> None:
    if not call.is_admin:
        raise PortalError(400, "ACCESS_DENIED", "Access denied!")


def _app_info(call: _Call) -> Any:
    return {
        "ID": 7,
        "CODE": call.state.config.client_id,
        "VERSION": 1,
        "STATUS": "L",
        "INSTALLED": True,
        "PAYMENT_EXPIRED": "N",
        "DAYS": None,
        "LANGUAGE_ID": "ru",
        "LICENSE": "ru_project",
    }


def _profile(call: _Call) -> Any:
    return {"ID": str(call.user_id), "ADMIN": call.is_admin, "NAME": f"User {call.user_id}"}


def _user_admin(call: _Call) -> Any:
    return call.is_admin


# -- bizproc.robot.* (wire doc 5) ------------------------------------------------------------


def _check_code(code: Any) -> str:
    if not code:
        raise _validation("Empty activity code!")
    if not isinstance(code, str) or not _CODE_RE.fullmatch(code):
        raise _validation("Wrong activity code!")
    return code


def _check_url(url: Any) -> None:
    """The core's `Bitrix\\Rest\\HandlerHelper::checkCallback` (rest/lib/handlerhelper.php), which
    `bizproc.robot.add`/`update` (restservice.php, validateActivityHandler) and `event.bind` use:
    the host must contain a dot after its first character (`strpos($host, '.') > 0`), so
    `localhost` or `myserver` is refused; only then is the scheme checked.
    """
    try:
        host = urlsplit(str(url)).hostname or ""
    except ValueError:
        host = ""
    if host.find(".") <= 0:
        raise PortalError(400, "ERROR_WRONG_HANDLER_URL", "Wrong handler URL")
    if urlsplit(str(url)).scheme not in ("http", "https"):
        raise PortalError(400, "ERROR_UNSUPPORTED_PROTOCOL", "Unsupported handler protocol")


def _check_properties(properties: Any) -> None:
    if not properties:  # omitted, "" or PHP's empty array `[]`
        return
    if not isinstance(properties, dict):
        raise _validation("Wrong properties array!")
    for key, descriptor in properties.items():
        if not _PROPERTY_KEY_RE.fullmatch(key):
            raise _validation(f"Wrong property key {key}!")
        if not isinstance(descriptor, dict) or not _property_name(descriptor):
            raise _validation(f"Empty property NAME {key}!")


def _property_name(descriptor: Mapping[str, Any]) -> Any:
    # Descriptor keys are documented Capitalized (`Name`), but the portal upper-cases them.
    return next((value for key, value in descriptor.items() if key.upper() == "NAME"), None)


def _check_robot_fields(fields: Mapping[str, Any], *, partial: bool) -> None:
    if "HANDLER" in fields or not partial:
        if not fields.get("HANDLER"):
            raise _validation("Empty activity HANDLER!")
        _check_url(fields["HANDLER"])
    if ("NAME" in fields or not partial) and not fields.get("NAME"):
        raise _validation("Empty activity NAME!")
    for key in ("PROPERTIES", "RETURN_PROPERTIES"):
        _check_properties(fields.get(key))
    document_type = fields.get("DOCUMENT_TYPE")
    if document_type and not (isinstance(document_type, list) and len(document_type) == 3):
        raise _validation("Wrong activity DOCUMENT_TYPE!")


def _robot_add(call: _Call) -> Any:
    _require_admin(call)
    fields = {key.upper(): value for key, value in call.params.items() if key != "auth"}
    if not fields:
        raise _validation("Empty data!")
    code = _check_code(fields.get("CODE"))
    _check_robot_fields(fields, partial=False)
    if code in call.state.robots:
        raise PortalError(400, "ERROR_ACTIVITY_ALREADY_INSTALLED", "Activity or Robot already installed!")
    # restservice.php addActivityInternal: `(int) $params['AUTH_USER_ID']`, 0 when absent.
    fields["AUTH_USER_ID"] = _php_int(fields.get("AUTH_USER_ID"))
    call.state.robots[code] = copy.deepcopy(fields)
    return True


def _php_int(value: Any) -> int:
    text = str(value or "").strip()
    return int(text) if text.isdigit() else 0


def _existing_robot(call: _Call) -> str:
    _require_admin(call)
    code = _check_code(call.param("code"))
    if code not in call.state.robots:
        raise PortalError(400, "ERROR_ACTIVITY_NOT_FOUND", "Activity or Robot not found!")
    return code


def _robot_update(call: _Call) -> Any:
    code = _existing_robot(call)
    fields = call.param("fields")
    if not isinstance(fields, dict) or not fields:
        raise _validation("No fields to update")
    updates = {key.upper(): value for key, value in fields.items()}
    _check_robot_fields(updates, partial=True)
    if "AUTH_USER_ID" in updates:
        updates["AUTH_USER_ID"] = _php_int(updates["AUTH_USER_ID"])
    call.state.robots[code].update(copy.deepcopy(updates))
    return True


def _robot_list(call: _Call) -> Any:
    _require_admin(call)
    return list(call.state.robots)


def _robot_delete(call: _Call) -> Any:
    del call.state.robots[_existing_robot(call)]
    return True


# -- event.* ---------------------------------------------------------------------------------


def _required_argument(call: _Call, name: str) -> str:
    value = call.param(name)
    if not value or not isinstance(value, str):
        raise PortalError(400, "ERROR_ARGUMENT", f"Argument '{name.upper()}' is null or empty")
    return value


def _event_bind(call: _Call) -> Any:
    _require_admin(call)
    event = _required_argument(call, "event").upper()
    handler = _required_argument(call, "handler")
    _check_url(handler)
    if any(e["event"] == event and e["handler"] == handler for e in call.state.events):
        raise PortalError(400, "ERROR_HANDLER_ALREADY_EXIST", "Handler already exists!")
    auth_type = str(call.param("auth_type") or 0)
    call.state.events.append({"event": event, "handler": handler, "auth_type": auth_type, "offline": 0})
    return True


def _event_get(call: _Call) -> Any:
    _require_admin(call)
    return copy.deepcopy(call.state.events)


def _event_unbind(call: _Call) -> Any:
    _require_admin(call)
    event = _required_argument(call, "event").upper()
    handler = call.param("handler")
    keep = [e for e in call.state.events if e["event"] != event or handler not in (None, e["handler"])]
    removed = len(call.state.events) - len(keep)
    call.state.events[:] = keep
    return {"count": removed}


# -- crm.contact.* and crm.duplicate.findbycomm (wire doc 8) ----------------------------------


def _multifield_items(value: Any) -> list[dict[str, Any]]:
    # Clients send a list, or an object keyed "n0", "n1", ... (both are PHP arrays).
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
    return [item for item in items if isinstance(item, dict)]


def _check_emails(fields: Mapping[str, Any]) -> None:
    for item in _multifield_items(fields.get("EMAIL")):
        value = str(item.get("VALUE") or "").strip()
        # Empty values are dropped by the portal, not rejected.
        if value and not _EMAIL_RE.fullmatch(value):
            raise PortalError(400, "ERROR_CORE", "The field Work e-mail contains an invalid address")


def _contact_add(call: _Call) -> Any:
    fields = call.param("fields")
    if fields == []:
        fields = {}  # JSON `[]` is an empty PHP array, which is still "an array"
    if not isinstance(fields, dict):
        raise PortalError(400, "", "Parameter 'fields' must be array.")
    params = call.param("params")
    if params and not isinstance(params, dict):
        raise PortalError(400, "", "Parameter 'params' must be array.")
    _check_emails(fields)
    state = call.state
    contact_id = len(state.contacts) + 1
    state.contacts.append({**copy.deepcopy(fields), "ID": contact_id})
    now = datetime.now().astimezone().isoformat(timespec="seconds")
    state.contact_meta[contact_id] = {"user_id": call.user_id, "created": now}
    return contact_id


def _php_string(value: Any) -> Any:
    # Legacy CRM methods hand every scalar back as a string.
    if isinstance(value, bool) or value is None or isinstance(value, dict | list):
        return value
    return str(value)


def _multifield_view(contact: Mapping[str, Any], type_id: str) -> list[dict[str, Any]]:
    items = [i for i in _multifield_items(contact.get(type_id)) if str(i.get("VALUE") or "")]
    return [
        {
            "ID": str(int(contact["ID"]) * 1000 + index),  # stable, unique per contact
            "VALUE_TYPE": str(item.get("VALUE_TYPE") or "WORK"),
            "VALUE": str(item["VALUE"]),
            "TYPE_ID": type_id,
        }
        for index, item in enumerate(items)
    ]


def _contact_view(state: _State, contact: Mapping[str, Any]) -> dict[str, Any]:
    meta = state.contact_meta.get(int(contact["ID"]), {})
    user = str(meta.get("user_id", state.config.admin_user_id))
    view: dict[str, Any] = {"ID": str(contact["ID"]), **dict.fromkeys(_CONTACT_KEYS)}
    view.update(OPENED="Y", EXPORT="Y", TYPE_ID="CLIENT", SOURCE_ID="SELF")
    view.update(ASSIGNED_BY_ID=user, CREATED_BY_ID=user, MODIFY_BY_ID=user)
    view.update(DATE_CREATE=meta.get("created"), DATE_MODIFY=meta.get("created"))
    for key, value in contact.items():
        if key not in _MULTIFIELDS and key != "ID":
            view[key] = _php_string(value)
    for type_id in _MULTIFIELDS:
        items = _multifield_view(contact, type_id)
        if items:
            view[type_id] = items
    view.update(HAS_PHONE="Y" if "PHONE" in view else "N", HAS_EMAIL="Y" if "EMAIL" in view else "N")
    view["HAS_IMOL"] = "N"
    return view


def _find_contact(call: _Call) -> dict[str, Any]:
    raw = call.param("id")
    contact_id = int(raw) if isinstance(raw, int | str) and str(raw).isdigit() else 0
    if contact_id <= 0:
        raise PortalError(400, "", "ID is not defined or invalid.")
    if contact_id > len(call.state.contacts):
        raise PortalError(400, "", "Not found")
    return call.state.contacts[contact_id - 1]


def _contact_get(call: _Call) -> Any:
    return _contact_view(call.state, _find_contact(call))


def _field_values(contact: Mapping[str, Any], name: str) -> list[str]:
    if name in _MULTIFIELDS:
        return [str(item.get("VALUE")) for item in _multifield_items(contact.get(name))]
    value = contact.get(name)
    return ["" if value is None else str(value)]


def _split_operator(key: str) -> tuple[str, str]:
    """``"!=ORIGIN_ID"`` -> ``("!=", "ORIGIN_ID")``; only the operators tests need are known.

    `@` is IN and `!@` NOT IN, with an array value (api-reference/crm/contacts/crm-contact-list.md).
    """
    for operator in ("!@", "!=", "!", "@", "=", "%"):
        if key.startswith(operator):
            return operator, key[len(operator) :]
    return "", key


def _matches(contact: Mapping[str, Any], conditions: Mapping[str, Any]) -> bool:
    for raw_key, expected in conditions.items():
        operator, name = _split_operator(raw_key)
        wanted = {str(v) for v in expected} if isinstance(expected, list) else {str(expected)}
        values = _field_values(contact, name.upper())
        if operator == "%":
            hit = any(w.lower() in v.lower() for w in wanted for v in values)
        else:
            hit = any(v in wanted for v in values)
        if hit == operator.startswith("!"):
            return False
    return True


def _select(view: dict[str, Any], select: Any) -> dict[str, Any]:
    wanted = [str(s).upper() for s in select] if isinstance(select, list) else []
    if not wanted or "*" in wanted:
        # `*` means scalar fields only; multifields must be asked for by name.
        return {k: v for k, v in view.items() if k not in _MULTIFIELDS or k in wanted}
    return {k: v for k, v in view.items() if k in wanted or k == "ID"}


def _sort_key(order: Any) -> tuple[Callable[[dict[str, Any]], Any], bool]:
    first = next(iter(order.items()), None) if isinstance(order, dict) else None
    name, direction = first or ("ID", "ASC")
    name = str(name).upper()
    reverse = str(direction).upper() == "DESC"
    if name == "ID":
        return (lambda contact: int(contact["ID"])), reverse
    return (lambda contact: str(contact.get(name) or "")), reverse


def _contact_list(call: _Call) -> Any:
    conditions = call.param("filter")
    conditions = conditions if isinstance(conditions, dict) else {}
    found = [c for c in call.state.contacts if _matches(c, conditions)]
    key, reverse = _sort_key(call.param("order"))
    found.sort(key=key, reverse=reverse)
    start = str(call.param("start") or "0")
    offset = max(0, int(start)) if start.lstrip("-").isdigit() else 0
    page = found[offset : offset + PAGE_SIZE]
    following = offset + PAGE_SIZE if offset + PAGE_SIZE < len(found) else None
    items = [_select(_contact_view(call.state, c), call.param("select")) for c in page]
    return _ListResult(items, len(found), following)


def _normalize_phone(value: str) -> str:
    """The portal's phone match code.

    crm/lib/integrity/duplicatecommunicationcriterion.php `normalizePhone` calls main/tools.php
    `NormalizePhone($value, 1)`: "+8..." becomes "008...", everything but digits, `#` and `*` is
    dropped, and a number of 10+ digits loses an international prefix (00, 011) or a trunk 0, while
    a leading 8 becomes 7 (80/81/82 stay). The docs add that the extension is not considered
    (api-reference/crm/duplicates/crm-duplicate-find-by-comm.md), so it is cut off first.
    """
    number = re.split(r"(?i)#|доб|ext|x(?=\s*\d)|;|,", value.strip())[0].strip()
    if len(number) >= 10 and number.startswith("+8"):
        number = "00" + number[1:]
    number = re.sub(r"[^0-9#*]", "", number)
    if len(number) >= 10 and number[:2] not in ("80", "81", "82"):
        if number.startswith("00"):
            number = number[2:]
        elif number.startswith("011"):
            number = number[3:]
        elif number.startswith("8"):
            number = "7" + number[1:]
        elif number.startswith("0"):
            number = number[1:]
    return number


def _comm_key(kind: str, value: Any) -> str:
    text = str(value).strip()
    # E-mail match codes are lower-cased (DuplicateCommunicationCriterion::prepareCodes).
    return text.lower() if kind == "EMAIL" else _normalize_phone(text)


def _find_by_comm(call: _Call) -> Any:
    """crm.duplicate.findbycomm as crm/classes/general/restservice.php `CCrmDuplicateRestProxy` runs it.

    `values` must be an array (a bare string is "not defined", as the RU tutorial
    tutorials/crm/how-to-get-lists/search-by-phone-and-email.md also says); non-strings and empty
    strings are skipped, equal values count once, at most 20 distinct values are searched and each
    finds at most 20 entities. Only types with hits appear, so an empty result is PHP's `[]`.
    """
    kind = str(call.param("type") or "").upper()
    if not kind:
        raise PortalError(400, "Communication type is not defined", "Parameter 'type' is required.")
    if kind not in ("EMAIL", "PHONE"):
        raise PortalError(400, f"Communication type '{kind}' is not supported in current context", "")
    values = call.param("values")
    if not isinstance(values, list) or not values:
        raise PortalError(400, "Communication values is not defined", "")
    entity = str(call.param("entity_type") or "").upper()
    if entity == "DEAL":
        raise PortalError(400, "Deal is not supported in current context.", "")
    codes = list(dict.fromkeys(_comm_key(kind, v) for v in values if isinstance(v, str) and v))[:20]
    hits: dict[str, list[int]] = {code: [] for code in codes if code}
    for contact in call.state.contacts:  # one scan: the portal reads an index of match codes
        for code in {_comm_key(kind, v) for v in _field_values(contact, kind) if v} & hits.keys():
            if len(hits[code]) < 20:
                hits[code].append(int(contact["ID"]))
    ids = list(dict.fromkeys(i for code in codes if code for i in hits[code]))
    # This portal keeps contacts only: an entity type other than CONTACT finds nothing here.
    return {"CONTACT": ids} if ids and entity in ("", "CONTACT") else []


def _contact_update(call: _Call) -> Any:
    """crm.contact.update (api-reference/crm/contacts/crm-contact-update.md): only the given fields
    change; a multifield row without `ID` is added, one with `ID` is changed, and one with `ID` and
    `DELETE=Y` or an empty `VALUE` is removed ("Working with Multiple Fields")."""
    raw = call.param("id")
    if not (isinstance(raw, int | str) and str(raw).isdigit() and int(raw) > 0):
        raise PortalError(400, "", "ID is not defined or invalid.")
    if int(raw) > len(call.state.contacts):
        raise PortalError(400, "", "Contact is not found")
    fields = call.param("fields")
    if not isinstance(fields, dict):
        raise PortalError(400, "", "Parameter 'fields' must be array.")
    fields = {key.upper(): value for key, value in fields.items()}
    _check_emails(fields)
    contact = call.state.contacts[int(raw) - 1]
    for key, value in fields.items():
        if key in _MULTIFIELDS:
            contact[key] = _merge_multifield(int(raw), _multifield_items(contact.get(key)), value)
        elif key != "ID":
            contact[key] = copy.deepcopy(value)
    return True


def _merge_multifield(contact_id: int, current: list[dict[str, Any]], rows: Any) -> list[dict[str, Any]]:
    # Existing rows are addressed by the IDs crm.contact.get shows (see _multifield_view).
    current = [item for item in current if str(item.get("VALUE") or "")]
    kept = {str(contact_id * 1000 + index): dict(item) for index, item in enumerate(current)}
    added: list[dict[str, Any]] = []
    for row in _multifield_items(rows):
        row_id, value = str(row.get("ID") or ""), str(row.get("VALUE") or "")
        if not row_id:
            if value:
                added.append({"VALUE": value, "VALUE_TYPE": str(row.get("VALUE_TYPE") or "WORK")})
        elif row_id in kept:
            if str(row.get("DELETE") or "").upper() == "Y" or not value:
                del kept[row_id]
            else:
                kept[row_id].update(VALUE=value, VALUE_TYPE=str(row.get("VALUE_TYPE") or "WORK"))
    return [*kept.values(), *added]


# -- bizproc.event.send / bizproc.activity.log (wire doc 7) -----------------------------------


def _signed_token(call: _Call) -> str:
    """The core refuses only a token whose signature fails: bizproc/lib/restservice.php,
    extractEventToken() -> CBPRestActivity::extractToken() (Signer::unsign with the salt
    'bizproc', bizproc/classes/general/restactivity.php) -> AccessException, which the REST
    server answers with 403 ACCESS_DENIED "Access denied!".
    """
    token = call.param("event_token")
    if not isinstance(token, str) or token not in call.state.issued:
        raise PortalError(403, "ACCESS_DENIED", "Access denied!")
    return token


def _event_send(call: _Call) -> Any:
    """restservice.php sendEvent(): a signed token is answered `true` at once; the event then
    reaches the activity (CBPRestActivity::onExternalEvent), which ignores it silently when it
    is already closed: answered before, timed out, or never waiting (use_subscription N).
    """
    token = _signed_token(call)
    return_values = call.param("return_values")
    answer = {
        "return_values": copy.deepcopy(return_values) if return_values not in (None, "", []) else {},
        "log_message": str(call.param("log_message") or ""),
    }
    if token in call.state.pending:
        call.state.pending.discard(token)
        call.state.answers[token] = answer
    else:
        call.state.dropped.append({"event_token": token, **answer})
    return True


def _activity_log(call: _Call) -> Any:
    token = _signed_token(call)
    if token not in call.state.pending:
        return True  # same path as sendEvent: a closed activity ignores it
    message = str(call.param("log_message") or "")
    call.state.activity_log.append({"event_token": token, "log_message": message})
    return True


_METHODS: dict[str, Callable[[_Call], Any]] = {
    "app.info": _app_info,
    "profile": _profile,
    "user.admin": _user_admin,
    "bizproc.robot.add": _robot_add,
    "bizproc.robot.update": _robot_update,
    "bizproc.robot.list": _robot_list,
    "bizproc.robot.delete": _robot_delete,
    "event.bind": _event_bind,
    "event.get": _event_get,
    "event.unbind": _event_unbind,
    "crm.contact.add": _contact_add,
    "crm.contact.get": _contact_get,
    "crm.contact.list": _contact_list,
    "crm.contact.update": _contact_update,
    "crm.duplicate.findbycomm": _find_by_comm,
    "bizproc.event.send": _event_send,
    "bizproc.activity.log": _activity_log,
}


# Only on plans with automation rules (see FakePortalConfig.automation_rules).
_AUTOMATION_METHODS = frozenset(
    name for name in _METHODS if name.startswith("bizproc.robot.") or name.startswith("bizproc.event.")
) | {"bizproc.activity.log"}


# --------------------------------------------------------------------------------------------
# Dispatch: rate limit, auth, batch
# --------------------------------------------------------------------------------------------


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp).astimezone().isoformat(timespec="seconds")


def _time_block(start: float, finish: float, operating: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The reply's `time` (wire doc 3.3); cloud portals add the method's `operating` figures (limits.md)."""
    return {
        "start": start,
        "finish": finish,
        "duration": finish - start,
        "processing": finish - start,
        "date_start": _iso(start),
        "date_finish": _iso(finish),
        **(operating or {}),
    }


def _method_name(raw: str) -> str:
    name = raw.strip("/").lower()  # Bitrix method names are case-insensitive
    return name[: -len(".json")] if name.endswith(".json") else name


def _lower_keys(params: Mapping[str, Any]) -> dict[str, Any]:
    return {key.lower(): value for key, value in params.items()}


def _truthy(value: Any) -> bool:
    return str(value).strip().lower() in ("1", "true", "y", "yes")


@dataclass
class _BatchOutcome:
    results: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, Any] = field(default_factory=dict)
    totals: dict[str, Any] = field(default_factory=dict)
    nexts: dict[str, Any] = field(default_factory=dict)
    times: dict[str, Any] = field(default_factory=dict)

    def add(self, cmd_id: str, result: Any, started: float, operating: Mapping[str, Any]) -> None:
        if isinstance(result, _ListResult):
            self.totals[cmd_id] = result.total
            if result.next is not None:
                self.nexts[cmd_id] = result.next
            result = result.items
        self.results[cmd_id] = result
        self.times[cmd_id] = _time_block(started, time.time(), operating)

    def references(self) -> dict[str, Any]:
        """What `$result[...]` and friends look into: the core's `$arResult` (CRestProvider::methodsBatch)."""
        return {
            "result": self.results,
            "next": self.nexts,
            "total": self.totals,
            "time": self.times,
            "error": self.errors,
        }

    def to_php(self) -> dict[str, Any]:
        return {
            "result": php_array(self.results),
            "result_error": php_array(self.errors),
            "result_total": php_array(self.totals),
            "result_next": php_array(self.nexts),
            "result_time": php_array(self.times),
        }


def _resolve_path(references: Mapping[str, Any], name: str, path: str) -> Any:
    """Walk `[a][b]...` from the named array; stop (keeping the node reached) at a missing key."""
    node: Any = references.get(name)  # case-sensitive: `$RESULT[...]` finds no array
    for key in _PATH_RE.findall(path):
        if isinstance(node, dict) and key in node and node[key] is not None:
            node = node[key]
        elif isinstance(node, list) and key.isdigit() and int(key) < len(node) and node[int(key)] is not None:
            node = node[int(key)]
        else:
            break  # PHP: `isset($r[$key])` failed
    return node


def _substitute_value(value: str, references: Mapping[str, Any], pattern: re.Pattern[str]) -> Any:
    """`CRestUtil::processBatchElement`: a reference that is the whole value becomes what it points to
    (any type, even an array or null); inside longer text it is replaced only by a string."""
    for match in list(pattern.finditer(value)):
        name, path = match.group(1), match.group(2)
        if not _PATH_RE.search(path):
            continue
        target = _resolve_path(references, name, path)
        if match.group(0) == value:
            return target
        if isinstance(target, str):
            value = value.replace(match.group(0), target)
    return value


def _substitute(value: Any, references: Mapping[str, Any]) -> Any:
    """`CRestUtil::processBatchStructure` over every key and value of a command's parameters.

    Every value (not just the documented `$result[cmd][field]`) is scanned, case-insensitively, for
    `$result`, `$next`, `$total`, `$time` and `$error`; there is no escape. Keys are scanned too,
    with an empty list of names, so a key holding `$[...]` resolves to nothing (wire doc 4.3).
    """
    if not isinstance(value, dict | list):
        return _substitute_value(value, references, _BATCH_REF_RE) if isinstance(value, str) else value
    items = value.items() if isinstance(value, dict) else enumerate(value)
    rebuilt: dict[Any, Any] = {}
    for key, item in items:
        new_key = _substitute_value(key, references, _BATCH_KEY_RE) if isinstance(key, str) else key
        rebuilt["" if new_key is None else new_key] = _substitute(item, references)
    if isinstance(value, list):
        return list(rebuilt.values())
    return rebuilt


def _batch_commands(cmd: Any) -> dict[str, str]:
    if isinstance(cmd, dict):
        return {str(key): str(value) for key, value in cmd.items()}
    if isinstance(cmd, list):
        return {str(index): str(value) for index, value in enumerate(cmd)}
    return {}


class _Dispatcher:
    """Runs one REST HTTP request; the caller holds ``state.lock``."""

    def __init__(self, state: _State) -> None:
        self.state = state

    def serve(self, method: str, params: dict[str, Any]) -> Any:
        state = self.state
        state.stats["rest_requests"] += 1
        if not state.bucket.allow():  # counted per HTTP request, before auth (wire doc 4.1)
            state.stats["rate_limited"] += 1
            raise PortalError(503, "QUERY_LIMIT_EXCEEDED", "Too many requests")
        if "/" in method:  # webhook URL form; this portal has no webhooks (wire doc 9)
            raise PortalError(401, "NO_AUTH_FOUND", "Wrong authorization data")
        token = params.get("auth")
        user_id = state.user_for(token if isinstance(token, str) else None)
        if method == "batch":
            return self.batch(user_id, params)
        return self.call(method, user_id, params)

    def call(self, method: str, user_id: int, params: dict[str, Any]) -> Any:
        self.state.stats["rest_commands"] += 1
        self.state.count_method(method)
        failure = self.state.take_failure(method)
        if failure is not None:
            raise failure
        handler = _METHODS.get(method)
        if handler is None or (method in _AUTOMATION_METHODS and not self.state.config.automation_rules):
            raise PortalError(404, "ERROR_METHOD_NOT_FOUND", "Method not found!")
        self.state.check_operating(method)  # before the call, per method (limits.md)
        started = time.time()
        try:
            return handler(_Call(self.state, user_id, params))
        finally:
            self.state.charge_operating(method, time.time() - started)

    def batch(self, user_id: int, params: dict[str, Any]) -> Any:
        self.state.stats["batches"] += 1
        self.state.count_method("batch")
        failure = self.state.take_failure("batch")
        if failure is not None:
            raise failure
        commands = _batch_commands(params.get("cmd"))
        if len(commands) > MAX_BATCH:
            raise PortalError(400, "ERROR_BATCH_LENGTH_EXCEEDED", "Max batch length exceeded")
        halt = _truthy(params.get("halt"))
        outcome = _BatchOutcome()
        for cmd_id, command in commands.items():
            if not self.run_command(user_id, cmd_id, command, outcome) and halt:
                break
        return outcome.to_php()

    def run_command(self, user_id: int, cmd_id: str, command: str, outcome: _BatchOutcome) -> bool:
        raw_method, _, query = command.partition("?")
        method = _method_name(raw_method)
        started = time.time()
        try:
            if method == "batch":
                raise PortalError(
                    405, "ERROR_BATCH_METHOD_NOT_ALLOWED", "Method is not allowed for batch usage"
                )
            parsed = parse_php_query(parse_qsl(query, keep_blank_values=True))
            params = _lower_keys(_substitute(parsed, outcome.references()))
            result = self.call(method, user_id, params)
            # Each nested call counts against its own method; the outer batch does not (limits.md).
            outcome.add(cmd_id, result, started, self.state.operating_figures(method))
        except PortalError as exc:
            self.state.note_error(f"batch[{cmd_id}] {method}", exc)
            outcome.errors[cmd_id] = exc.body()
            return False
        return True


# --------------------------------------------------------------------------------------------
# OAuth authorization server (wire doc 2)
# --------------------------------------------------------------------------------------------


def _grant_tokens(state: _State, params: Mapping[str, str]) -> dict[str, Any]:
    failure = state.take_failure("oauth.token")
    if failure is not None:
        raise failure
    grant_type = params.get("grant_type", "")
    missing = [k for k in ("grant_type", "client_id", "client_secret") if not params.get(k)]
    if missing:
        raise PortalError(400, "invalid_request", f"Missing parameter: {', '.join(missing)}")
    config = state.config
    if params["client_id"] != config.client_id or params["client_secret"] != config.client_secret:
        raise PortalError(401, "invalid_client", "Invalid client_id or client_secret")
    if grant_type not in ("authorization_code", "refresh_token"):
        raise PortalError(400, "invalid_request", f"Unsupported grant_type {grant_type!r}")
    secret_name = "code" if grant_type == "authorization_code" else "refresh_token"
    secret = params.get(secret_name)
    if not secret:
        raise PortalError(400, "invalid_request", f"Missing parameter: {secret_name}")
    if grant_type == "authorization_code":
        user_id = state.consume_code(secret)
        state.stats["code_exchanges"] += 1
    else:
        user_id = state.rotate_refresh(secret)
        state.stats["refreshes"] += 1
    return state.token_response(state.issue_tokens(user_id))


# --------------------------------------------------------------------------------------------
# HTTP layer
# --------------------------------------------------------------------------------------------


def _multipart_pairs(content_type: str, body: bytes) -> list[tuple[str, str]]:
    # The stdlib MIME parser avoids a python-multipart dependency; file parts are ignored.
    head = f"Content-Type: {content_type}\r\n\r\n".encode()
    message = BytesParser(policy=policy.HTTP).parsebytes(head + body)
    pairs: list[tuple[str, str]] = []
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        content = part.get_content()
        if isinstance(name, str) and part.get_filename() is None and isinstance(content, str):
            pairs.append((name, content))
    return pairs


async def _read_body(request: Request) -> dict[str, Any]:
    body = await request.body()
    if not body.strip():
        return {}
    content_type = request.headers.get("content-type", "")
    if "json" in content_type.lower():
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise PortalError(400, "INVALID_REQUEST", "Request body is not a JSON object")
        return data
    if content_type.lower().startswith("multipart/"):
        return parse_php_query(_multipart_pairs(content_type, body))
    return parse_php_query(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))


async def _read_params(request: Request) -> dict[str, Any]:
    """Query string and body merged, top-level names lower-cased (wire doc 3.2)."""
    params = _lower_keys(parse_php_query(parse_qsl(request.url.query, keep_blank_values=True)))
    if request.method == "POST":
        params.update(_lower_keys(await _read_body(request)))
    return params


async def _read_flat(request: Request) -> dict[str, str]:
    params = dict(parse_qsl(request.url.query, keep_blank_values=True))
    if request.method == "POST":
        body = (await request.body()).decode("utf-8", "replace")
        params.update(parse_qsl(body, keep_blank_values=True))
    return params


async def _json_object(request: Request) -> dict[str, Any]:
    body = await request.body()
    data = json.loads(body) if body.strip() else {}
    return data if isinstance(data, dict) else {}


def _error_response(error: PortalError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


class FakePortal:
    """A fake Bitrix24 portal + OAuth server; see the module docstring."""

    def __init__(self, config: FakePortalConfig | None = None) -> None:
        self.config = config or FakePortalConfig()
        self._state = _State(self.config)
        self._dispatcher = _Dispatcher(self._state)
        self._released = threading.Event()
        self._released.set()
        self._replies_released = threading.Event()
        self._replies_released.set()
        self._replies_to_pass = 0  # replies still answered at once after hold(replies=True, after=n)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self.app = Starlette(routes=self._routes())

    # -- addresses ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if not self._state.url:
            raise RuntimeError("FakePortal has no address yet: call start() or set .url")
        return self._state.url

    @url.setter
    def url(self, value: str) -> None:
        # Settable so the ASGI app can also be driven in-process (e.g. httpx.ASGITransport).
        self._state.url = value.rstrip("/")

    @property
    def domain(self) -> str:
        return urlsplit(self.url).netloc

    @property
    def client_endpoint(self) -> str:
        return self.url + "/rest/"

    @property
    def bound_url(self) -> str:
        """Where the server really listens (`http://127.0.0.1:port`), whatever `url` it claims."""
        if self._socket is None:
            raise RuntimeError("FakePortal is not running")
        return f"http://127.0.0.1:{self._socket.getsockname()[1]}"

    def rename(self, new_url: str) -> None:
        """The portal's address changes; its old one answers 302 to the new one from now on
        (settings/how-to-call-rest-api/change-domen.md). Tokens, member_id and robots stay."""
        with self._state.lock:
            self._state.moved[self.domain] = new_url.rstrip("/")
            self.url = new_url

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, port: int = 0) -> None:
        """Serve on 127.0.0.1:`port` (0 = any free port) from a daemon thread."""
        if self._thread is not None:
            raise RuntimeError("FakePortal is already running")
        # Binding ourselves tells us the port before uvicorn starts, with no race.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        self._socket = sock
        self.url = self.config.public_url or f"http://127.0.0.1:{sock.getsockname()[1]}"
        config = uvicorn.Config(
            self.app, log_level="warning", access_log=False, lifespan="off",
            timeout_graceful_shutdown=2,
        )  # fmt: skip
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="fake-portal", daemon=True
        )
        self._thread.start()
        self._wait_until_serving()

    def _wait_until_serving(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self._server is not None and not self._server.started:
            if self._thread is None or not self._thread.is_alive():
                raise RuntimeError("FakePortal server thread died during startup")
            if time.monotonic() > deadline:
                raise RuntimeError("FakePortal did not start in time")
            time.sleep(0.005)

    def stop(self) -> None:
        self.release()  # held requests would otherwise block the graceful shutdown
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._socket is not None:
            self._socket.close()
        self._server, self._thread, self._socket = None, None, None

    def __enter__(self) -> FakePortal:
        if self._thread is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # -- bodies the portal would send to the app ---------------------------------------------

    def _auth_block(self, pair: _TokenPair | None, application_token: str | None) -> dict[str, Any]:
        """Event ``auth[...]`` in the order captured from real portals (wire doc 1.2, 1.5)."""
        app_token = application_token or self.application_token
        if pair is None:  # ONAPPUNINSTALL carries exactly these five keys
            return {
                "domain": self.domain,
                "server_endpoint": self._state.server_endpoint,
                "client_endpoint": self.client_endpoint,
                "member_id": self.config.member_id,
                "application_token": app_token,
            }
        return {
            "access_token": pair.access_token,
            "expires": pair.expires,
            "expires_in": int(self.config.access_ttl),
            "scope": SCOPE,
            "domain": self.domain,
            "server_endpoint": self._state.server_endpoint,
            "status": "L",
            "client_endpoint": self.client_endpoint,
            "member_id": self.config.member_id,
            "user_id": pair.user_id,
            "refresh_token": pair.refresh_token,
            "application_token": app_token,
        }

    def install_event_body(self, *, application_token: str | None = None, user_id: int = 1) -> str:
        """ONAPPINSTALL (wire doc 1.2); a given application_token becomes the portal's token."""
        if application_token is not None:
            with self._state.lock:
                self._state.app_token = application_token
        pair = self._state.issue_tokens(user_id)
        data = {"VERSION": "1", "ACTIVE": "Y", "INSTALLED": "Y", "LANGUAGE_ID": self.config.language}
        return build_php_query(
            [
                ("event", "ONAPPINSTALL"),
                ("data", data),
                ("ts", str(int(time.time()))),
                ("auth", self._auth_block(pair, None)),
            ]
        )

    def iframe_install(self, *, user_id: int = 1) -> tuple[str, str]:
        """(query string, form body) of the UI install / app-page POST (wire doc 1.4)."""
        pair = self._state.issue_tokens(user_id)
        query = build_php_query(
            [
                ("DOMAIN", self.domain),
                ("PROTOCOL", "0"),
                ("LANG", self.config.language),
                ("APP_SID", secrets.token_hex(16)),
            ]
        )
        body = build_php_query(
            [
                ("AUTH_ID", pair.access_token),
                ("AUTH_EXPIRES", str(int(self.config.access_ttl))),
                ("REFRESH_ID", pair.refresh_token),
                ("SERVER_ENDPOINT", self._state.server_endpoint),
                ("APPLICATION_TOKEN", self.application_token),
                ("APPLICATION_SCOPE", SCOPE),
                ("member_id", self.config.member_id),
                ("status", "L"),
                ("PLACEMENT", "DEFAULT"),
                ("PLACEMENT_OPTIONS", "{}"),
            ]
        )
        return query, body

    def _robot_user(self, code: str) -> tuple[int, bool]:
        """Whose token the call carries and whether the workflow waits (robot's settings)."""
        with self._state.lock:
            robot = copy.deepcopy(self._state.robots.get(code, {}))
        raw_user = str(robot.get("AUTH_USER_ID") or "")
        user_id = int(raw_user) if raw_user.isdigit() else self.config.admin_user_id
        waits = str(robot.get("USE_SUBSCRIPTION") or "Y").upper() != "N"  # empty means wait
        return user_id, waits

    def _robot_properties(self, code: str, given: Mapping[str, Any]) -> dict[str, Any]:
        """`properties[...]` as the portal fills them: every registered input, nothing else.

        bizproc/classes/general/restactivity.php `execute()` sends each of the robot's PROPERTIES:
        the designer's value (its `Default` when never set, `''` when empty) after
        FieldType::externalizeValue, which leaves a `select` its option key and a `user` its
        internal `user_<id>` form (bizproc/lib/basetype/select.php, user.php). Keys in `given` that
        the robot does not have are passed on too, after the registered ones: a real portal never
        sends them, but tests forge such bodies on purpose. A robot this portal does not know gets
        `given` unchanged.
        """
        with self._state.lock:
            registered = copy.deepcopy(self._state.robots.get(code, {}).get("PROPERTIES"))
        if not isinstance(registered, dict):
            return dict(given)
        values: dict[str, Any] = {}
        for key, descriptor in registered.items():
            default = next((v for k, v in descriptor.items() if k.upper() == "DEFAULT"), None)
            value = given.get(key, default)
            values[key] = "" if value is None else value
        return {**values, **{key: value for key, value in given.items() if key not in values}}

    def robot_call_body(
        self,
        properties: Mapping[str, Any],
        *,
        code: str = "create_contact",
        document_id: tuple[str, str, str] = ("crm", "CCrmDocumentDeal", "DEAL_4521"),
        timeout_duration: int | None = VARIED,
        event_token: str | None = None,
        application_token: str | None = None,
        use_subscription: str | None = None,
    ) -> tuple[str, str]:
        """(event_token, body) of a robot invocation (wire doc 6.3); the token is then pending.

        Re-using an ``event_token`` models a redelivery: an already answered token stays
        answered, so a second ``bizproc.event.send`` is accepted and dropped. ``use_subscription``
        is the robot's "wait for the answer" switch as the workflow's author set it in the
        designer (restactivity.php: the `UseSubscription` property, defaulting to the robot's
        USE_SUBSCRIPTION); with "N" the workflow goes on at once and waits for nothing.
        ``timeout_duration`` None leaves the field out; by default calls cycle through
        ``TIMEOUT_DURATIONS``.
        """
        if timeout_duration == VARIED:
            with self._state.lock:
                timeout_duration = TIMEOUT_DURATIONS[self._state.timeouts % len(TIMEOUT_DURATIONS)]
                self._state.timeouts += 1
        workflow_id = event_token.split("|", 1)[0] if event_token else _new_workflow_id()
        token = event_token or _new_event_token(workflow_id)
        user_id, waits = self._robot_user(code)
        if use_subscription is not None:
            waits = use_subscription.upper() == "Y"
        with self._state.lock:
            self._state.issued.add(token)
            if waits and token not in self._state.answers:
                self._state.pending.add(token)
        pair = self._state.issue_tokens(user_id)
        document_type = [document_id[0], document_id[1], document_id[2].rsplit("_", 1)[0]]
        body = build_php_query(
            [
                ("workflow_id", workflow_id),
                ("code", code),
                ("document_id", list(document_id)),
                ("document_type", document_type),
                ("event_token", token),
                ("properties", self._robot_properties(code, properties)),
                ("use_subscription", "Y" if waits else "N"),
                ("timeout_duration", timeout_duration),
                ("ts", str(int(time.time()))),
                ("auth", self._auth_block(pair, application_token)),
            ]
        )
        return token, body

    def update_event_body(
        self, *, application_token: str | None = None, user_id: int = 1, version: str = "2"
    ) -> str:
        """ONAPPUPDATE as `api-reference/common/events/on-app-update.md` documents it.

        The portal also does what an update does: the core's `onRestAppUpdate` deletes the app's
        robots (bizproc/lib/restservice.php; `bizproc-robot-delete.md`: "When the application is
        deleted or updated, the associated robots are removed"). A given application_token
        becomes the portal's new one (`security-recommendations.md`: update the stored value
        "if Bitrix24 has provided a new application_token").
        """
        with self._state.lock:
            self._state.robots.clear()
            if application_token is not None:
                self._state.app_token = application_token
        pair = self._state.issue_tokens(user_id)
        auth = self._auth_block(pair, None)
        auth.pop("expires")  # the documented ONAPPUPDATE auth block has no `expires` ...
        auth.pop("user_id")  # ... and no `user_id`
        data = {"VERSION": version, "PREVIOUS_VERSION": "1", "LANGUAGE_ID": self.config.language}
        return build_php_query(
            [("event", "ONAPPUPDATE"), ("data", data), ("ts", str(int(time.time()))), ("auth", auth)]
        )

    def uninstall_event_body(self, *, application_token: str | None = None, revoke: bool = True) -> str:
        """ONAPPUNINSTALL without tokens (wire doc 1.5).

        With ``revoke`` (default) the portal also does what uninstalling does: every token dies
        and the app's robots, event handlers and waiting workflows disappear.
        """
        if revoke:
            with self._state.lock:
                self._state.revoke_all()
                self._state.robots.clear()
                self._state.events.clear()
                self._state.pending.clear()
        return build_php_query(
            [
                ("event", "ONAPPUNINSTALL"),
                ("data", {"LANGUAGE_ID": self.config.language, "CLEAN": "1"}),
                ("ts", str(int(time.time()))),
                ("auth", self._auth_block(None, application_token)),
            ]
        )

    def authorize_redirect(self, state: str) -> str:
        """Where /oauth/authorize/ sends the browser, with a fresh code (wire doc 2.3)."""
        code = secrets.token_hex(16)
        with self._state.lock:
            expires_at = time.time() + self.config.code_ttl
            self._state.codes[code] = _Grant(self.config.admin_user_id, expires_at)
        # The token endpoint lives on this same server, so it is also the "server_domain".
        query = urlencode(
            [
                ("code", code),
                ("state", state),
                ("domain", self.domain),
                ("member_id", self.config.member_id),
                ("scope", SCOPE),
                ("server_domain", urlsplit(self._state.server_endpoint).netloc),
            ]
        )
        separator = "&" if "?" in self.config.redirect_uri else "?"
        return f"{self.config.redirect_uri}{separator}{query}"

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

    # -- HTTP endpoints ----------------------------------------------------------------------------

    def _routes(self) -> list[Route]:
        both = ["GET", "POST"]
        control = _ControlApi(self)
        return [
            Route("/rest/{method:path}", self._rest, methods=both),
            Route("/oauth/token/", self._oauth_token, methods=both),
            Route("/oauth/token", self._oauth_token, methods=both),
            Route("/oauth/authorize/", self._oauth_authorize, methods=["GET"]),
            Route("/oauth/authorize", self._oauth_authorize, methods=["GET"]),
            Route("/marketplace/app/{app_id}/", self._open_app, methods=["GET"]),
            Route("/", self._crm_page, methods=["GET"]),
            Route("/crm/{entity}/details/{number}/", self._crm_page, methods=["GET"]),
            Route("/crm/type/{type_id}/details/{number}/", self._crm_page, methods=["GET"]),
            *control.routes(),
        ]

    async def _wait_while_held(self, gate: threading.Event | None = None) -> None:
        gate = gate or self._released
        if gate.is_set():
            return
        with self._state.lock:
            self._state.stats["held_requests"] += 1
        try:
            while not gate.is_set():
                await asyncio.sleep(0.01)  # poll: never block the server's event loop
        finally:
            with self._state.lock:
                self._state.stats["held_requests"] -= 1

    async def _stall(self, seconds: float) -> None:
        """Sleep, counted in `held_requests` so that a test can wait until every request is over."""
        with self._state.lock:
            self._state.stats["held_requests"] += 1
        try:
            await asyncio.sleep(seconds)
        finally:
            with self._state.lock:
                self._state.stats["held_requests"] -= 1

    def _moved_away(self, request: Request) -> Response | None:
        """A renamed portal's old host redirects every REST call to the new one (change-domen.md)."""
        with self._state.lock:
            new_url = self._state.moved.get(request.headers.get("host", ""))
        if new_url is None:
            return None
        query = f"?{request.url.query}" if request.url.query else ""
        return RedirectResponse(f"{new_url}{request.url.path}{query}", status_code=302)

    async def _method_held(self, method: str) -> bool:
        with self._state.lock:
            return method in self._state.held_methods

    async def _rest(self, request: Request) -> Response:
        moved = self._moved_away(request)
        if moved is not None:
            return moved
        await self._wait_while_held()
        method = _method_name(str(request.path_params["method"]))
        started = time.time()
        params: dict[str, Any] = {}
        bad_body: PortalError | None = None
        try:
            params = await _read_params(request)  # awaited outside the lock, never under it
        except PortalError as exc:
            bad_body = exc
        # Held after the body is read: a client that gives up meanwhile leaves nothing unread.
        while await self._method_held(method):
            await asyncio.sleep(0.01)
        with self._state.lock:
            late = self._state.take_late_reply(method)
        if late is not None and late.slow_work:
            await self._stall(late.delay)
        with self._state.lock:
            try:
                if bad_body is not None:
                    raise bad_body
                result = self._dispatcher.serve(method, params)
                # The outer `batch` is not counted against its own limit (limits.md): its figures stay 0.
                figures = self._state.operating_figures(method)
                # JSONResponse renders immediately, so stored objects are not shared past the lock.
                response: Response = JSONResponse(self._envelope(result, started, figures))
            except PortalError as exc:
                self._state.note_error(method, exc)
                response = _error_response(exc)
        await self._hold_reply()
        if late is not None:
            if not late.slow_work:
                await self._stall(late.delay)
            if late.status is not None:  # the gateway's page, not a Bitrix envelope
                return HTMLResponse("<html><body>Bad Gateway</body></html>", status_code=late.status)
        return response

    async def _hold_reply(self) -> None:
        """With `hold(replies=True)`, wait before replying; `after` lets that many replies through."""
        with self._state.lock:
            passing, self._replies_to_pass = self._replies_to_pass > 0, max(0, self._replies_to_pass - 1)
        if not passing:
            await self._wait_while_held(self._replies_released)

    @staticmethod
    def _envelope(result: Any, started: float, figures: Mapping[str, Any]) -> dict[str, Any]:
        if not isinstance(result, _ListResult):
            return {"result": result, "time": _time_block(started, time.time(), figures)}
        envelope: dict[str, Any] = {"result": result.items}
        if result.next is not None:
            envelope["next"] = result.next
        envelope["total"] = result.total
        envelope["time"] = _time_block(started, time.time(), figures)
        return envelope

    async def _oauth_token(self, request: Request) -> Response:
        params = await _read_flat(request)
        host = request.headers.get("host", "")
        with self._state.lock:
            self._state.stats["token_requests"] += 1
            self._state.token_hosts.append(host)
            oauth = self.config.oauth_url
            if oauth and host != urlsplit(oauth).netloc:
                # Cloud tokens come from the region's authorization server only (settings/oauth/index.md).
                return JSONResponse({"error": "not_found", "error_description": "Not found"}, status_code=404)
            try:
                return JSONResponse(_grant_tokens(self._state, params))
            except PortalError as exc:
                self._state.note_error("oauth.token", exc)
                return _error_response(exc)

    async def _oauth_authorize(self, request: Request) -> Response:
        if request.query_params.get("client_id") != self.config.client_id:
            # A real portal shows its own error page and never redirects (wire doc 2.2).
            page = "<html><body><h1>Application not found</h1></body></html>"
            return HTMLResponse(page, status_code=400)
        state = request.query_params.get("state", "")
        return RedirectResponse(self.authorize_redirect(state), status_code=302)

    async def _open_app(self, request: Request) -> Response:
        """The portal's page of a local app (`/marketplace/app/<id>/`): the frame form, POSTed into an iframe.

        `?handler=` is the app's handler path. The real portal's page is the same in what matters
        here: a form with `AUTH_ID`, `member_id`, ... in the body and `DOMAIN`, `PROTOCOL`, `LANG`,
        `APP_SID` in the query, submitted into a frame the app's page then lives in
        (b24restdocs `settings/oauth/simple-way.md`).
        """
        handler = request.query_params.get("handler", "")
        query, body = self.iframe_install()
        action = html.escape(f"{handler}?{query}")
        inputs = "".join(
            f'<input type="hidden" name="{html.escape(key)}" value="{html.escape(value)}">'
            for key, value in parse_qsl(body, keep_blank_values=True)
        )
        page = (
            '<!doctype html><html><head><meta charset="utf-8"><title>Bitrix24</title>'
            '<link rel="icon" href="data:,"></head><body style="margin:0">'
            '<iframe name="app" id="app" style="border:0;width:100%;height:100vh"></iframe>'
            f'<form id="open" method="post" target="app" action="{action}">'
            f"{inputs}</form><script>document.getElementById('open').submit();</script></body></html>"
        )
        return HTMLResponse(page)

    async def _crm_page(self, request: Request) -> Response:
        """The portal's start page, or a CRM item's (`/crm/deal/details/4521/`): links into it resolve."""
        title = html.escape(request.url.path)
        return HTMLResponse(
            f'<!doctype html><html><head><meta charset="utf-8"><title>{title}</title>'
            f'<link rel="icon" href="data:,"></head><body><h1 id="crm-item">{title}</h1></body></html>'
        )


class _ControlApi:
    """JSON endpoints under /_fake/ so another process can drive and inspect the portal."""

    def __init__(self, portal: FakePortal) -> None:
        self.portal = portal

    def routes(self) -> list[Route]:
        get, post = ["GET"], ["POST"]
        return [
            Route("/_fake/stats", self.stats, methods=get),
            Route("/_fake/answers", self.answers, methods=get),
            Route("/_fake/contacts", self.contacts, methods=get),
            Route("/_fake/robots", self.robots, methods=get),
            Route("/_fake/events", self.events, methods=get),
            Route("/_fake/install-body", self.install_body, methods=post),
            Route("/_fake/iframe-install", self.iframe_install, methods=post),
            Route("/_fake/uninstall-body", self.uninstall_body, methods=post),
            Route("/_fake/update-body", self.update_body, methods=post),
            Route("/_fake/robot-body", self.robot_body, methods=post),
            Route("/_fake/authorize-redirect", self.authorize_redirect, methods=post),
            Route("/_fake/hold", self.hold, methods=post),
            Route("/_fake/release", self.release, methods=post),
            Route("/_fake/expire-tokens", self.expire_tokens, methods=post),
            Route("/_fake/rate-limit", self.rate_limit, methods=post),
            Route("/_fake/fail-next", self.fail_next, methods=post),
        ]

    async def stats(self, request: Request) -> Response:
        portal = self.portal
        counts = {
            "contacts": len(portal.contacts),
            "answers": len(portal.answers),
            "robots": len(portal.robots),
            "bound_events": len(portal.bound_events),
            "pending": len(portal.pending_event_tokens),
        }
        return JSONResponse({**portal.stats, **counts, "recent_errors": portal.recent_errors})

    async def answers(self, request: Request) -> Response:
        return JSONResponse(self.portal.answers)

    async def contacts(self, request: Request) -> Response:
        return JSONResponse(self.portal.contacts)

    async def robots(self, request: Request) -> Response:
        return JSONResponse(self.portal.robots)

    async def events(self, request: Request) -> Response:
        return JSONResponse(self.portal.bound_events)

    async def install_body(self, request: Request) -> Response:
        data = await _json_object(request)
        body = self.portal.install_event_body(
            application_token=data.get("application_token"), user_id=int(data.get("user_id", 1))
        )
        return JSONResponse({"body": body})

    async def iframe_install(self, request: Request) -> Response:
        data = await _json_object(request)
        query, body = self.portal.iframe_install(user_id=int(data.get("user_id", 1)))
        return JSONResponse({"query": query, "body": body})

    async def uninstall_body(self, request: Request) -> Response:
        data = await _json_object(request)
        body = self.portal.uninstall_event_body(
            application_token=data.get("application_token"), revoke=bool(data.get("revoke", True))
        )
        return JSONResponse({"body": body})

    async def update_body(self, request: Request) -> Response:
        data = await _json_object(request)
        body = self.portal.update_event_body(
            application_token=data.get("application_token"), user_id=int(data.get("user_id", 1))
        )
        return JSONResponse({"body": body})

    async def robot_body(self, request: Request) -> Response:
        data = await _json_object(request)
        options: dict[str, Any] = {
            key: data[key] for key in ("code", "event_token", "application_token") if key in data
        }
        if "timeout_duration" in data:
            options["timeout_duration"] = data["timeout_duration"]
        if "document_id" in data:
            options["document_id"] = tuple(data["document_id"])
        if "use_subscription" in data:
            options["use_subscription"] = str(data["use_subscription"])
        token, body = self.portal.robot_call_body(data.get("properties") or {}, **options)
        return JSONResponse({"event_token": token, "body": body})

    async def authorize_redirect(self, request: Request) -> Response:
        data = await _json_object(request)
        return JSONResponse({"location": self.portal.authorize_redirect(str(data.get("state", "")))})

    async def hold(self, request: Request) -> Response:
        self.portal.hold()
        return JSONResponse({"ok": True})

    async def release(self, request: Request) -> Response:
        self.portal.release()
        return JSONResponse({"ok": True})

    async def expire_tokens(self, request: Request) -> Response:
        self.portal.expire_access_tokens()
        return JSONResponse({"ok": True})

    async def rate_limit(self, request: Request) -> Response:
        data = await _json_object(request)
        burst = data.get("burst")
        self.portal.set_rate_limit(None if burst is None else int(burst), float(data["drain"]))
        return JSONResponse({"ok": True})

    async def fail_next(self, request: Request) -> Response:
        data = await _json_object(request)
        self.portal.fail_next(
            str(data["method"]),
            int(data["status"]),
            str(data["error"]),
            str(data.get("description", "")),
            int(data.get("times", 1)),
        )
        return JSONResponse({"ok": True})


# --------------------------------------------------------------------------------------------
# CLI: python -m tests.fake_portal --port 8100
# --------------------------------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    defaults = FakePortalConfig()
    parser = argparse.ArgumentParser(description="Fake Bitrix24 portal + OAuth server")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--client-id", default=defaults.client_id)
    parser.add_argument("--client-secret", default=defaults.client_secret)
    parser.add_argument("--member-id", default=defaults.member_id)
    parser.add_argument("--rate-burst", type=int, default=defaults.rate_burst)
    parser.add_argument("--rate-drain", type=float, default=defaults.rate_drain)
    parser.add_argument("--no-rate-limit", action="store_true")
    parser.add_argument("--access-ttl", type=float, default=defaults.access_ttl)
    parser.add_argument("--code-ttl", type=float, default=defaults.code_ttl)
    parser.add_argument("--refresh-ttl", type=float, default=defaults.refresh_ttl)
    parser.add_argument("--lenient-refresh", action="store_true", help="old refresh tokens live on")
    parser.add_argument("--redirect-uri", default=defaults.redirect_uri)
    parser.add_argument("--language", default=defaults.language, help="LANGUAGE_ID and LANG: en, ru, ...")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    config = FakePortalConfig(
        client_id=args.client_id,
        client_secret=args.client_secret,
        member_id=args.member_id,
        access_ttl=args.access_ttl,
        code_ttl=args.code_ttl,
        refresh_ttl=args.refresh_ttl,
        strict_refresh=not args.lenient_refresh,
        rate_burst=None if args.no_rate_limit else args.rate_burst,
        rate_drain=args.rate_drain,
        redirect_uri=args.redirect_uri,
        language=args.language,
    )
    portal = FakePortal(config)
    portal.start(port=args.port)
    stopping = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    print(f"FAKE_PORTAL_READY {portal.url}", flush=True)
    try:
        while not stopping.wait(0.5):  # a timed wait keeps the main thread responsive to signals
            pass
    finally:
        portal.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
