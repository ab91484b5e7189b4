"""The Bitrix24 client's error tree and the classification of error envelopes (`api_error`).


    BitrixError                        retryable?
    ├── BitrixTransportError           yes  connect/read timeout, connection reset
    ├── BitrixApiError                 no   the portal answered with an `error` envelope
    │   ├── BitrixAuthError            no   NO_AUTH_FOUND, invalid_token, 401: re-authorize
    │   │   └── BitrixTokenExpired     no   expired_token: refresh once, replay once
    │   ├── BitrixWrongAuthType        no   WRONG_AUTH_TYPE: the method wants another kind of auth
    │   ├── BitrixInvalidCredentials   no   INVALID_CREDENTIALS: the token's user lacks the rights
    │   ├── BitrixUserInactive         no   authorization_error: the installing user was deactivated
    │   ├── BitrixAppNotInstalled      no   ERROR_OAUTH, APPLICATION_NOT_FOUND: the portal lost the app
    │   ├── BitrixConfirmationPending  yes  METHOD_CONFIRM_WAITING (401): an administrator must allow it
    │   ├── BitrixConfirmationDenied   no   METHOD_CONFIRM_DENIED
    │   ├── BitrixPaymentRequired      no   PAYMENT_REQUIRED: the app's subscription ran out
    │   ├── BitrixScopeMissing         no   insufficient_scope, ACCESS_DENIED about scope or plan
    │   ├── BitrixAccessDenied         no   ACCESS_DENIED (e.g. a workflow that is gone)
    │   ├── BitrixRateLimitError       yes  QUERY_LIMIT_EXCEEDED (503)
    │   │   └── BitrixMethodLimited    yes  OPERATION_TIME_LIMIT (429): only at `resume_at`
    │   └── BitrixServerError          yes  5xx, unreadable replies
    ├── PortalMoved                    yes  the portal was renamed and BITRIX_PORTAL_URL pins the old name
    ├── OAuthError                     no   the authorization server refused to issue tokens
    │   ├── OAuthInvalidGrant          no   invalid_grant: re-authorize at /oauth/login
    │   ├── OAuthInvalidClient         no   invalid_client, wrong_client: check the credentials
    │   └── OAuthPaymentRequired       no   PAYMENT_REQUIRED: renew the subscription
    ├── PortalNotConnected             no   no usable tokens are stored for the portal
    └── NoSpareCapacity                no   an install proof found no spare room in the rate limit

An error with a `resume_at` is not retried within the request: the job worker reschedules it for
that time (the portal's reset time of a method's time limit, say). Codes and meanings: b24restdocs
`_includes/system-errors.md`, `api-reference/scopes/confirmation.md`, `settings/oauth/error-codes.md`,
`settings/cloud-and-on-premise/on-premise/custom-auth-provider.md` (authorization_error, ERROR_OAUTH).
"""

import time


class BitrixError(Exception):
    """Base of every failure talking to Bitrix24."""

    retryable = False
    # Whether the portal may have run the request although the app got no answer (a read timeout,
    # a 5xx): a non-idempotent request must then not be sent again blindly.
    may_have_run = False
    admin_hint = "Check the portal and the app's log."

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.resume_at: float | None = None  # unix time before which trying again is pointless


class BitrixTransportError(BitrixError):
    retryable = True
    admin_hint = "The portal could not be reached; check the network between the app and Bitrix24."

    def __init__(self, message: str, *, may_have_run: bool = True) -> None:
        super().__init__(message)
        self.may_have_run = may_have_run


class BitrixApiError(BitrixError):
    """An error envelope: `error` may be an empty string, `error_description` is technical text."""

    def __init__(self, status_code: int, error: str, description: str, method: str) -> None:
        label = error or "error"
        super().__init__(f"{method}: {label} ({status_code}): {description}")
        self.status_code = status_code
        self.error = error
        self.description = description
        self.method = method


class BitrixAuthError(BitrixApiError):
    admin_hint = "The portal rejected the app's token; open /oauth/login to authorize the app again."


class BitrixTokenExpired(BitrixAuthError):
    pass


class BitrixWrongAuthType(BitrixApiError):
    admin_hint = (
        "The method refuses this kind of authorization (it needs the app's own OAuth context); "
        "authorizing again will not help."
    )


class BitrixInvalidCredentials(BitrixApiError):
    admin_hint = (
        "The portal user whose token the app uses lacks the rights this method needs; give that user "
        "the rights or reinstall the app as an administrator. Authorizing again as the same user "
        "will not help."
    )


class BitrixUserInactive(BitrixApiError):
    admin_hint = (
        "The portal user who installed the app was deactivated; reinstall the app as an active administrator."
    )


class BitrixAppNotInstalled(BitrixApiError):
    admin_hint = (
        "The portal no longer knows this app (removed, or BITRIX_CLIENT_ID is another app's); "
        "install it again."
    )


class BitrixConfirmationPending(BitrixApiError):
    retryable = True
    admin_hint = (
        "A portal administrator must allow this method: confirm the app's request in the portal's "
        "notifications; the app keeps trying."
    )


class BitrixConfirmationDenied(BitrixApiError):
    admin_hint = "A portal administrator denied this method to the app; allow it in the portal."


class BitrixPaymentRequired(BitrixApiError):
    admin_hint = "The app's subscription or the portal's plan has run out; renew it in the portal."


class BitrixScopeMissing(BitrixApiError):
    admin_hint = (
        "The app lacks a permission this method needs: give it the crm and bizproc scopes in the "
        "portal's app settings and reinstall it (the REST API also needs a commercial plan)."
    )


class BitrixAccessDenied(BitrixApiError):
    admin_hint = "Access denied by the portal; check the app's scopes (crm, bizproc) and user rights."


class BitrixRateLimitError(BitrixApiError):
    retryable = True
    admin_hint = "The portal's REST rate limit was exceeded; the app retried and gave up."


class BitrixMethodLimited(BitrixRateLimitError):
    admin_hint = (
        "The portal's time limit for this method (OPERATION_TIME_LIMIT) is used up; the app calls it "
        "again when the portal resets it and goes on with other methods meanwhile."
    )


class PortalMoved(BitrixError):
    """The portal answers from a new address that the settings do not allow."""

    retryable = True
    admin_hint = "The portal has a new address; see the log for the setting to change."

    def __init__(self, message: str, new_url: str) -> None:
        super().__init__(message)
        self.new_url = new_url
        self.resume_at = time.time() + 300.0  # nothing changes until an administrator acts


class BitrixServerError(BitrixApiError):
    retryable = True
    may_have_run = True
    admin_hint = "The portal answered with a server error; the app retried and gave up."


class OAuthError(BitrixError):
    def __init__(self, status_code: int, error: str, description: str) -> None:
        super().__init__(f"OAuth server: {error or 'error'} ({status_code}): {description}")
        self.status_code = status_code
        self.error = error


class OAuthInvalidGrant(OAuthError):
    admin_hint = "The refresh token is no longer valid; open /oauth/login to authorize the app again."


class OAuthInvalidClient(OAuthError):
    admin_hint = "The OAuth server rejected the app; check BITRIX_CLIENT_ID and BITRIX_CLIENT_SECRET."


class OAuthPaymentRequired(OAuthError):
    admin_hint = "The app's subscription on the portal has expired; renew it in the portal."


class PortalNotConnected(BitrixError):
    admin_hint = "The app holds no tokens for this portal; install the app or open /oauth/login."


class NoSpareCapacity(BitrixError):
    admin_hint = "Unproven installs may only use the portal's rate limit while a fifth of it stays free."


_AUTH_CODES = {"NO_AUTH_FOUND", "INVALID_TOKEN"}
_RATE_CODES = {"QUERY_LIMIT_EXCEEDED", "OVERLOAD_LIMIT"}
# Codes whose meaning does not depend on the HTTP status (checked before the status is looked at).
_CODE_CLASSES: dict[str, type[BitrixApiError]] = {
    "EXPIRED_TOKEN": BitrixTokenExpired,
    "WRONG_AUTH_TYPE": BitrixWrongAuthType,
    "INVALID_CREDENTIALS": BitrixInvalidCredentials,
    "AUTHORIZATION_ERROR": BitrixUserInactive,
    "ERROR_OAUTH": BitrixAppNotInstalled,
    "APPLICATION_NOT_FOUND": BitrixAppNotInstalled,
    "METHOD_CONFIRM_WAITING": BitrixConfirmationPending,
    "METHOD_CONFIRM_DENIED": BitrixConfirmationDenied,
    "PAYMENT_REQUIRED": BitrixPaymentRequired,
    "INSUFFICIENT_SCOPE": BitrixScopeMissing,
    "OPERATION_TIME_LIMIT": BitrixMethodLimited,
}
# ACCESS_DENIED is reused by many methods; these texts mean the app's permissions or plan.
_SCOPE_TEXTS = ("scope", "commercial plan", "higher privileges")
_PERMANENT_CODES = {"PORTAL_DELETED"}  # a 500 that no retry will fix
_SERVER_CODES = {"INTERNAL_SERVER_ERROR", "ERROR_UNEXPECTED_ANSWER"}
_OAUTH_ERRORS: dict[str, type[OAuthError]] = {
    "invalid_grant": OAuthInvalidGrant,
    "invalid_client": OAuthInvalidClient,
    "wrong_client": OAuthInvalidClient,
    "payment_required": OAuthPaymentRequired,
}


def api_error(status_code: int, error: str, description: str, method: str) -> BitrixApiError:
    """The typed error for one error envelope: the body's code first, then the HTTP status."""
    code = error.upper()
    cls: type[BitrixApiError]
    if code in _CODE_CLASSES:
        cls = _CODE_CLASSES[code]
    elif code == "ACCESS_DENIED" and any(text in description.lower() for text in _SCOPE_TEXTS):
        cls = BitrixScopeMissing
    elif code in _AUTH_CODES or (status_code == 401 and not code):
        cls = BitrixAuthError
    elif code in _RATE_CODES or (status_code in (429, 503) and not code):
        cls = BitrixRateLimitError
    elif code in _PERMANENT_CODES:
        cls = BitrixApiError
    elif code == "ACCESS_DENIED":
        cls = BitrixAccessDenied
    elif code in _SERVER_CODES or status_code >= 500:
        cls = BitrixServerError
    else:
        cls = BitrixApiError
    return cls(status_code, error, description, method)


def action_hint(error: BitrixError) -> str:
    """The admin hint of a classified portal error, after a space; "" for an unclassified one."""
    if type(error) in (BitrixApiError, BitrixServerError):
        return ""
    return f" {error.admin_hint}"
