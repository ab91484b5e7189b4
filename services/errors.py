"""Domain errors of the app. `main.register_exception_handlers` maps them to HTTP in one place,
together with the repositories' `TokenStoreError` (503 `storage_error`) and the client's `BitrixError`.

AppError                      status, stable `code`, message
├── BadRequest                400  the body is not what this endpoint takes
│   ├── PayloadTooLarge       413
│   ├── UnsupportedMediaType  415
│   └── RequestTimeout        408  the body did not arrive in time (the connection is closed)
├── InvalidOAuthState         400  wrong, used, expired or foreign `state`
├── UnknownPortal             401  `member_id` of a portal we never installed
├── InvalidApplicationToken   403  `application_token` does not match the stored one
├── ForeignPortal             403  a portal other than the configured one
├── InstallRejected           403  tokens the portal does not confirm as ours
├── TooManyInstalls           429  unproven installs of this portal are already being checked
├── NotConfigured             503  required settings are missing
├── AutomationUnavailable     409  the portal's plan has no automation rules (no bizproc.robot.*)
├── HandlerUrlRefused         409  the portal refuses APP_BASE_URL as a handler address
└── UpstreamUnavailable       502  the portal or the OAuth server failed
"""

from enum import StrEnum


class ErrorCode(StrEnum):
    BAD_REQUEST = "bad_request"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    REQUEST_TIMEOUT = "request_timeout"
    INVALID_STATE = "invalid_oauth_state"
    UNKNOWN_PORTAL = "unknown_portal"
    INVALID_APPLICATION_TOKEN = "invalid_application_token"  # noqa: S105 (a code, not a secret)
    FOREIGN_PORTAL = "foreign_portal"
    INSTALL_REJECTED = "install_rejected"
    TOO_MANY_INSTALLS = "too_many_installs"
    NOT_CONFIGURED = "not_configured"
    STORAGE_ERROR = "storage_error"
    UPSTREAM_UNAVAILABLE = "upstream_unavailable"
    AUTOMATION_UNAVAILABLE = "automation_unavailable"
    HANDLER_URL_REFUSED = "handler_url_refused"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    HTTP_ERROR = "http_error"


class AppError(Exception):
    """Base of every error the app reports to a caller."""

    status_code = 400
    code = ErrorCode.BAD_REQUEST
    close_connection = False  # the rest of the request may still be on its way: do not reuse

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(AppError):
    pass


class PayloadTooLarge(BadRequest):
    status_code = 413
    code = ErrorCode.PAYLOAD_TOO_LARGE


class UnsupportedMediaType(BadRequest):
    status_code = 415
    code = ErrorCode.UNSUPPORTED_MEDIA_TYPE


class RequestTimeout(BadRequest):
    status_code = 408
    code = ErrorCode.REQUEST_TIMEOUT
    close_connection = True


class InvalidOAuthState(AppError):
    code = ErrorCode.INVALID_STATE


class UnknownPortal(AppError):
    status_code = 401
    code = ErrorCode.UNKNOWN_PORTAL


class InvalidApplicationToken(AppError):
    status_code = 403
    code = ErrorCode.INVALID_APPLICATION_TOKEN


class ForeignPortal(AppError):
    status_code = 403
    code = ErrorCode.FOREIGN_PORTAL


class InstallRejected(AppError):
    status_code = 403
    code = ErrorCode.INSTALL_REJECTED


class TooManyInstalls(AppError):
    status_code = 429
    code = ErrorCode.TOO_MANY_INSTALLS


class NotConfigured(AppError):
    status_code = 503
    code = ErrorCode.NOT_CONFIGURED


class UpstreamUnavailable(AppError):
    status_code = 502
    code = ErrorCode.UPSTREAM_UNAVAILABLE


class AutomationUnavailable(AppError):
    status_code = 409
    code = ErrorCode.AUTOMATION_UNAVAILABLE


class HandlerUrlRefused(AppError):
    status_code = 409
    code = ErrorCode.HANDLER_URL_REFUSED
