"""Wire models: the portal's form-encoded callbacks, OAuth replies, stored records and API replies.

Bitrix24 posts `application/x-www-form-urlencoded` bodies with PHP bracket keys
(`auth[member_id]`, `document_id[2]`, `properties[phone]`); `parse_php_form` rebuilds the nesting
once, and the models below validate the result.
"""

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

# Re-exported: the decoder lives with the other guards of unauthenticated input.
from services.php_form import parse_php_form as parse_php_form

MEMBER_ID = r"^[0-9A-Za-z_-]{1,64}$"


def _upper(value: object) -> object:
    # Event names arrive in either case (`ONAPPINSTALL`, `OnAppInstall`).
    return value.upper() if isinstance(value, str) else value


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)


class EventAuth(_Wire):
    """The `auth[...]` block of an event or robot call."""

    domain: str = Field(min_length=1, max_length=255)
    client_endpoint: str = Field(min_length=1, max_length=512)
    member_id: str = Field(pattern=MEMBER_ID)
    application_token: str = Field(min_length=1, max_length=256)
    access_token: str | None = None
    refresh_token: str | None = None
    expires: int | None = None
    expires_in: int | None = None
    scope: str = ""
    server_endpoint: str | None = None
    status: str | None = None
    user_id: int | None = None

    @field_validator("expires", "expires_in", "user_id", mode="before")
    @classmethod
    def _blank_is_none(cls, value: object) -> object:
        return None if value == "" else value


class InstallEvent(_Wire):
    """Server-to-server `ONAPPINSTALL` event."""

    event: Annotated[Literal["ONAPPINSTALL"], BeforeValidator(_upper)]
    auth: EventAuth
    data: dict[str, Any] = Field(default_factory=dict)


class UninstallEvent(_Wire):
    """`ONAPPUNINSTALL` event: no tokens, only `application_token` proves it."""

    event: Annotated[Literal["ONAPPUNINSTALL"], BeforeValidator(_upper)]
    auth: EventAuth


class UpdateEvent(_Wire):
    """`ONAPPUPDATE` (`api-reference/common/events/on-app-update.md`): carries fresh tokens."""

    event: Annotated[Literal["ONAPPUPDATE"], BeforeValidator(_upper)]
    auth: EventAuth
    data: dict[str, Any] = Field(default_factory=dict)


class IframeInstall(_Wire):
    """The install page opened in the portal frame: tokens in the body, `DOMAIN` in the query."""

    AUTH_ID: str = Field(min_length=1)
    REFRESH_ID: str = Field(min_length=1)
    AUTH_EXPIRES: int = 3600
    APPLICATION_TOKEN: str = Field(min_length=1, max_length=256)
    APPLICATION_SCOPE: str = ""
    SERVER_ENDPOINT: str | None = None
    member_id: str = Field(pattern=MEMBER_ID)
    DOMAIN: str = Field(min_length=1, max_length=255)
    PROTOCOL: Literal["0", "1"] = "1"
    LANG: str = Field(default="", max_length=16)  # the user's interface language (query string)


class RobotCall(_Wire):
    """What the portal posts to the robot's `HANDLER` when a workflow reaches it."""

    event_token: str = Field(min_length=1, max_length=1024)
    auth: EventAuth
    workflow_id: str = Field(default="", max_length=128)
    code: str = Field(default="", max_length=128)
    document_id: list[str] = Field(default_factory=list)
    document_type: list[str] = Field(default_factory=list)
    properties: dict[str, Any] = Field(default_factory=dict)
    use_subscription: str = "Y"
    timeout_duration: int | None = Field(default=None, ge=0)
    ts: int | None = None


class TokenResponse(_Wire):
    """Reply of the authorization server to a code exchange or a refresh."""

    access_token: str = Field(min_length=1)
    refresh_token: str | None = None
    expires_in: int = 3600
    expires: int | None = None
    client_endpoint: str = Field(min_length=1)
    server_endpoint: str | None = None
    member_id: str = Field(pattern=MEMBER_ID)
    scope: str = ""
    status: str | None = None
    user_id: int | None = None


# "The lifetime of `refresh_token` is 180 days" (b24restdocs settings/oauth/auto-renewal.md).
REFRESH_TOKEN_LIFETIME = 180 * 86400.0


class PortalTokens(BaseModel):
    """One portal's record in the token store."""

    member_id: str
    domain: str
    client_endpoint: str
    access_token: str | None = None
    refresh_token: str | None = None
    expires_at: float = 0.0
    application_token: str | None = None
    scope: str = ""
    user_id: int | None = None
    server_endpoint: str | None = None
    robot_registered_at: float | None = None
    # Why the robot is not registered, in words an administrator can act on; None when it is.
    robot_problem: str | None = None
    updated_at: float = Field(default_factory=time.time)
    # The portal's language (`LANGUAGE_ID` of the install, `LANG` of the frame): the workflow's
    # messages are in it. None: the portal has not said.
    language: str | None = None
    # When the refresh token was issued (it dies 180 days later); None: at `updated_at` or before.
    refresh_issued_at: float | None = None
    # Set when the stored pair no longer works (the refresh was refused for good): the sentence
    # health and the status page show. A new pair (refresh, robot call, install, login) clears it.
    disconnected_reason: str | None = None
    renamed_from: str | None = None  # the portal's previous host, after a rename the app followed
    moved_to: str | None = None  # a new REST address the settings refused (BITRIX_PORTAL_URL pins the old)

    def expires_within(self, seconds: float) -> bool:
        return self.expires_at - time.time() < seconds

    @property
    def works(self) -> bool:
        """Whether this pair can still be used and refreshed, as far as the app knows."""
        usable = bool(self.access_token and self.refresh_token) and self.disconnected_reason is None
        return usable and not self.refresh_expired()

    def refresh_expired(self) -> bool:
        """Past the refresh token's documented lifetime: the OAuth server no longer takes it."""
        return self.refresh_age() >= REFRESH_TOKEN_LIFETIME

    def refresh_age(self) -> float:
        """Seconds since the refresh token was issued."""
        return time.time() - (self.refresh_issued_at or self.updated_at)

    def with_tokens(self, reply: TokenResponse) -> "PortalTokens":
        """The record after a refresh; a reply without a refresh token keeps the old one."""
        return self.model_copy(
            update={
                "access_token": reply.access_token,
                "refresh_token": reply.refresh_token or self.refresh_token,
                "expires_at": expiry(reply.expires, reply.expires_in),
                "scope": reply.scope or self.scope,
                "user_id": reply.user_id if reply.user_id is not None else self.user_id,
                "server_endpoint": reply.server_endpoint or self.server_endpoint,
                "updated_at": time.time(),
                "refresh_issued_at": time.time() if reply.refresh_token else self.refresh_issued_at,
                "disconnected_reason": None,
            }
        )


def expiry(expires: int | None, expires_in: int | None) -> float:
    """Absolute expiry; our own clock wins over the portal's `expires` to survive clock skew."""
    if expires_in:
        return time.time() + expires_in
    return float(expires) if expires else time.time() + 3600


class ErrorBody(BaseModel):
    """Body of every error reply."""

    error: str
    detail: str


class RobotAck(BaseModel):
    """Reply to an accepted robot call."""

    status: Literal["accepted", "duplicate"]
    job_id: int

    def json_bytes(self) -> bytes:
        """The reply body, as `model_dump_json()` writes it: both fields need no escaping, so it
        is formatted directly (0.3 us against 2.5 us on the busiest route)."""
        return b'{"status":"%s","job_id":%d}' % (self.status.encode(), self.job_id)


class QueueStats(BaseModel):
    """State of the job journal."""

    pending: int = 0
    oldest_pending_age_seconds: float | None = None
    done: int = 0
    failed: int = 0
    abandoned: int = 0
    retrying: int = 0  # pending jobs whose last RETRYING_AFTER attempts or more failed
    failed_last_day: int = 0  # jobs that failed for good in the last 24 hours
    # Of `done`: answered with `contact_id` 0 and a reason (bad data, or the portal refused).
    answered_with_error: int = 0


class PortalStatus(BaseModel):
    """What the status page says about one portal (no secrets)."""

    member_id: str
    domain: str
    token_valid_for_seconds: int
    can_refresh: bool
    robot_registered: bool
    refresh_token_age_days: float | None = None  # None: the store does not know when it was issued
    refresh_token_days_left: float | None = None
    robot_checked_at: float | None = None  # when the robot was last registered or checked
    robot_problem: str | None = None
    # False when the stored pair no longer works; `disconnected_reason` then says why and what helps.
    connected: bool = True
    disconnected_reason: str | None = None
    # Set while the newest tokens are only in memory because the token file cannot be written.
    tokens_unsaved: str | None = None
    renamed_from: str | None = None  # the previous host of a renamed portal the app followed
    moved_to: str | None = None  # a new address refused because BITRIX_PORTAL_URL pins the old one
    move_advice: str | None = None  # what to change then, in one sentence


class RobotRun(BaseModel):
    """One recent robot call, for the status page."""

    job_id: int
    member_id: str
    workflow_id: str
    state: str
    contact_id: int
    error: str
    created_at: float
    document_id: str = ""  # `crm/CCrmDocumentDeal/DEAL_4521`: the CRM document the workflow runs on


class InstanceSeen(BaseModel):
    """One app instance that shares the database, from its heartbeat."""

    instance: str
    seen_seconds_ago: float
    leader: bool


class ClusterStatus(BaseModel):
    """Where the state lives and which instance runs the job worker."""

    backend: Literal["embedded", "postgresql"]
    instance: str
    worker_leader: str | None = None  # None: not known to this instance (embedded, another process)
    instances: list[InstanceSeen] = Field(default_factory=list)  # seen in the last minute


class Health(BaseModel):
    """`GET /health` reply."""

    status: Literal["ok", "degraded", "down"] = "ok"
    reasons: list[str] = Field(default_factory=list)
    portal_connected: bool
    robot_registered: bool
    missing_settings: list[str]
    token_store_error: str | None = None
    queue: QueueStats
    cluster: ClusterStatus | None = None


class HandlerWarning(BaseModel):
    """Why the portal may not reach the robot handler: a message key of the page and its values."""

    code: Literal["dotless_host", "private_address", "plain_http", "port_mismatch"]
    host: str = ""
    url_port: int | None = None
    listen_port: int | None = None


class HealthReason(BaseModel):
    """One of /health's reasons, for the status page: a message key (`health_<key>` in
    services/messages.py) and its values, so the page words it in its own language."""

    key: Literal[
        "journal_down",
        "token_store_down",
        "tokens_unsaved",
        "missing_settings",
        "no_portal",
        "no_usable_tokens",
        "failed_last_day",
        "retrying",
    ]
    values: dict[str, str | int] = Field(default_factory=dict)


class StatusReport(BaseModel):
    """The status page: portal details and recent runs only for a verified portal user."""

    health: Health
    health_reasons: list[HealthReason] = Field(default_factory=list)  # health.reasons, to be worded
    portals: list[PortalStatus] = Field(default_factory=list)
    runs: list[RobotRun] = Field(default_factory=list)
    verified: bool = False
    handler_url: str = ""
    handler_warnings: list[HandlerWarning] = Field(default_factory=list)
    portal_url: str | None = None  # https://example.bitrix24.ru, for links to CRM documents
    portals_installed: int = 0  # stored portals, also for a page seen outside the portal
    language: Literal["ru", "en"] = "en"


class AppFrame(_Wire):
    """The POST the portal sends when a user opens the app in its frame."""

    member_id: str = Field(pattern=MEMBER_ID)
    APPLICATION_TOKEN: str = Field(min_length=1, max_length=256)
    DOMAIN: str = Field(min_length=1, max_length=255)
    PROTOCOL: Literal["0", "1"] = "1"
    LANG: str = Field(default="", max_length=16)  # the user's interface language (query string)

    def as_auth(self) -> EventAuth:
        """The frame's credentials in the shape every callback check takes."""
        scheme = "https" if self.PROTOCOL == "1" else "http"
        return EventAuth(
            domain=self.DOMAIN,
            client_endpoint=f"{scheme}://{self.DOMAIN}/rest/",
            member_id=self.member_id,
            application_token=self.APPLICATION_TOKEN,
        )
