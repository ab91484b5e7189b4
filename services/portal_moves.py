"""Renamed portals: a portal keeps its `member_id` when its address changes.

Its old address then answers 302 to the new one (b24restdocs
`settings/how-to-call-rest-api/change-domen.md`), and the authorization server's refresh replies
carry the current `client_endpoint` (wire doc 2.5). The app follows a rename only to an address it
would accept at install (`services.trust.allowed_portal`): where `BITRIX_PORTAL_URL` pins the old
address, it refuses and says which setting to change. The stored record keeps the fact
(`renamed_from` after a followed rename, `moved_to` for one that was refused) for the status page.
"""

import logging
from urllib.parse import urljoin, urlsplit

from config import Settings
from schemas import PortalTokens
from services.errors import ForeignPortal
from services.trust import allowed_portal, rest_base

logger = logging.getLogger(__name__)


class MoveRefused(Exception):
    """The portal moved to an address the settings do not allow."""

    def __init__(self, message: str, new_url: str) -> None:
        super().__init__(message)
        self.new_url = new_url


def endpoint_from_location(client_endpoint: str, location: str) -> str:
    """The new REST base from a redirect's `Location` (the method's URL at the new host)."""
    target = urlsplit(urljoin(client_endpoint, location))
    return rest_base(f"{target.scheme}://{target.netloc}{urlsplit(client_endpoint).path}")


def moved_record(settings: Settings, record: PortalTokens, new_endpoint: str) -> PortalTokens:
    """`record` at its new address, or MoveRefused when the settings do not allow that address."""
    base = rest_base(new_endpoint)
    parts = urlsplit(base)
    new_url = f"{parts.scheme}://{parts.netloc}"
    if settings.portal_host and parts.netloc != settings.portal_host:
        message = (
            f"The portal {record.domain} has moved to {parts.netloc}, but BITRIX_PORTAL_URL="
            f"{settings.bitrix_portal_url} pins its old address: set BITRIX_PORTAL_URL={new_url} "
            "(in .env or the environment) and restart the app."
        )
        logger.error("%s", message)
        raise MoveRefused(message, new_url)
    try:
        allowed_portal(settings, parts.netloc, base)
    except ForeignPortal as exc:
        message = f"The portal {record.domain} redirects to {parts.netloc}, which is refused: {exc.message}"
        logger.error("%s", message)
        raise MoveRefused(message, new_url) from exc
    if parts.netloc != record.domain:
        logger.warning(
            "The portal %s was renamed to %s; its new address is stored", record.domain, parts.netloc
        )
    update = {
        "domain": parts.netloc,
        "client_endpoint": base,
        "renamed_from": record.domain,
        "moved_to": None,
    }
    return record.model_copy(update=update)


def move_advice(record: PortalTokens) -> str | None:
    """For the status page: the setting to change when a rename was refused."""
    if not record.moved_to:
        return None
    parts = urlsplit(record.moved_to)
    return (
        f"The portal {record.domain} has moved to {parts.netloc}: set BITRIX_PORTAL_URL="
        f"{parts.scheme}://{parts.netloc} and restart the app."
    )
