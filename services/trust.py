"""Who may talk to the app: which portals may install it, and which callbacks are authentic."""

import logging
import re
import secrets
from functools import lru_cache
from urllib.parse import urlsplit

from config import Settings
from schemas import EventAuth, PortalTokens
from services.errors import ForeignPortal, InvalidApplicationToken, UnknownPortal

logger = logging.getLogger(__name__)

# Bitrix24 cloud portals live on <name>.bitrix24.<zone>; anything else must be configured.
_CLOUD = re.compile(
    r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.bitrix24\."
    r"(?:ru|com|de|eu|by|kz|ua|es|fr|it|pl|in|cn|jp|vn|id|tr|uk|site|shop|online|com\.br|com\.tr|co\.uk|com\.mx|com\.co)$"
)


@lru_cache(maxsize=1024)
def rest_base(client_endpoint: str) -> str:
    """`https://host/rest/` in one canonical spelling."""
    parts = urlsplit(client_endpoint.strip())
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}{parts.path.rstrip('/')}/"


def allowed_portal(settings: Settings, domain: str, client_endpoint: str) -> str:
    """The REST base of a portal that may install the app, or ForeignPortal.

    Built from the verified scheme and host with the path `/rest/`: the path of a caller's
    `client_endpoint` is the caller's choice, and the app must not POST tokens wherever it says.
    """
    endpoint = urlsplit(rest_base(client_endpoint))
    host = domain.strip().lower()
    if endpoint.netloc != host:
        raise ForeignPortal(f"The portal {host!r} sent a REST address on another host.")
    if settings.bitrix_portal_url:
        configured = urlsplit(settings.bitrix_portal_url)
        if host != settings.portal_host or endpoint.scheme != configured.scheme.lower():
            raise ForeignPortal(f"Only {settings.bitrix_portal_url} may use this app; {host!r} may not.")
    elif endpoint.scheme != "https" or not _CLOUD.match(host.split(":")[0]) or ":" in host:
        raise ForeignPortal(
            f"{host!r} is not a Bitrix24 cloud portal on https; set BITRIX_PORTAL_URL to allow it."
        )
    return f"{endpoint.scheme}://{host}/rest/"


def verify_callback(settings: Settings, record: PortalTokens | None, auth: EventAuth) -> PortalTokens:
    """The stored record of the portal that sent this callback, if the callback is authentic."""
    if record is None:
        raise UnknownPortal("This portal has not installed the app (unknown member_id).")
    stored = record.application_token or ""
    if not secrets.compare_digest(stored.encode(), auth.application_token.encode()) or not stored:
        raise InvalidApplicationToken("The application_token does not match the one stored at install.")
    host = auth.domain.strip().lower()
    if host != record.domain.lower() or rest_base(auth.client_endpoint) != rest_base(record.client_endpoint):
        _renamed_portal(settings, record, host, auth.client_endpoint)
    if settings.portal_host and record.domain.lower() != settings.portal_host:
        raise ForeignPortal("The callback comes from a portal other than BITRIX_PORTAL_URL.")
    return record


def _renamed_portal(settings: Settings, record: PortalTokens, host: str, client_endpoint: str) -> None:
    """An authentic call (member_id and application_token match) from another address.

    A renamed portal keeps its member_id and application_token and calls from its new address
    (settings/how-to-call-rest-api/change-domen.md), so the call is accepted when that address is
    one the app would accept at install. Nothing here changes where the app sends its requests:
    those still go to the stored address, which the portal redirects (services.portal_moves).
    """
    if settings.portal_host and host != settings.portal_host:
        logger.error(
            "Portal %s (member_id %s) now calls from %s, but BITRIX_PORTAL_URL=%s pins the old address: "
            "if the portal was renamed, set BITRIX_PORTAL_URL=https://%s and restart the app.",
            record.domain,
            record.member_id,
            host[:255],
            settings.bitrix_portal_url,
            host[:255],
        )
        raise ForeignPortal("The callback comes from a portal other than BITRIX_PORTAL_URL.")
    try:
        allowed_portal(settings, host, client_endpoint)
    except ForeignPortal as exc:
        raise ForeignPortal("The callback names another portal than the one that installed the app.") from exc
