"""Which authorization server refreshes a portal's tokens and exchanges its codes.

Portals in Russia, Belarus, Kazakhstan, Uzbekistan, Armenia, Azerbaijan, Georgia and Kyrgyzstan
use `oauth.bitrix24.tech`, the others `oauth.bitrix.info` (b24restdocs `settings/oauth/index.md`
and its Russian edition; wire doc 2.1: "Do not hard-code: use `server_domain` (redirect) /
`server_endpoint` (token & events)"). The portal names its server in the install's
`server_endpoint` and the OAuth redirect's `server_domain`. The request that carries it is not
proof of anything, so `client_secret` goes only to those two hosts or to `BITRIX_OAUTH_URL`;
any other name falls back to `BITRIX_OAUTH_URL`.
"""

import logging
from urllib.parse import urlsplit

from config import Settings

logger = logging.getLogger(__name__)

REGION_SERVERS = frozenset({"oauth.bitrix.info", "oauth.bitrix24.tech"})


def server_host(server: str | None) -> str:
    """`oauth.bitrix24.tech` from `https://oauth.bitrix24.tech/rest/` or from the bare host."""
    text = (server or "").strip()
    return (urlsplit(text).netloc if "://" in text else text).lower()


def token_endpoint(settings: Settings, server: str | None) -> str:
    """The token URL for a portal whose authorization server is `server` (None: not known)."""
    host = server_host(server)
    if not host or host == urlsplit(settings.bitrix_oauth_url).netloc.lower():
        return settings.token_endpoint
    if host in REGION_SERVERS:
        return f"https://{host}/oauth/token/"
    logger.warning(
        "The portal names the authorization server %r, which is neither oauth.bitrix.info, "
        "oauth.bitrix24.tech nor BITRIX_OAUTH_URL; the secret goes to BITRIX_OAUTH_URL instead",
        host[:100],
    )
    return settings.token_endpoint
