"""Can the portal reach the robot handler at `APP_BASE_URL`? The first reason robot calls never arrive.

Robot calls come from Bitrix24's queue servers on the internet, not from the administrator's
browser (b24restdocs `settings/cloud-and-on-premise/network-access.md`), so a handler on a
dotless host (`localhost`, `myserver`), on a private address, or on a port the app does not listen
on cannot work. Plain http works but sends every call's tokens in the clear. One function decides;
the startup log and the status page both show what it finds. `/health` is not changed by it: it
reports what the app observes, not what it suspects.
"""

import ipaddress
import logging
from urllib.parse import urlsplit

from schemas import HandlerWarning

logger = logging.getLogger(__name__)
_DEFAULT_PORTS = {"http": 80, "https": 443}


def handler_warnings(base_url: str, listen_port: int | None) -> list[HandlerWarning]:
    """What is wrong with `APP_BASE_URL` as the portal's way in; `listen_port` is the app's own port."""
    parts = urlsplit(base_url)
    host = (parts.hostname or "").lower()
    warnings: list[HandlerWarning] = []
    local = _is_private(host)
    if "." not in host and ":" not in host:
        warnings.append(HandlerWarning(code="dotless_host", host=host))
    elif local:
        warnings.append(HandlerWarning(code="private_address", host=host))
    if parts.scheme != "https":
        warnings.append(HandlerWarning(code="plain_http", host=host))
    try:
        url_port = parts.port or _DEFAULT_PORTS.get(parts.scheme)
    except ValueError:
        url_port = None
    # Behind a reverse proxy the public port (443) differs from the app's (8000) on purpose: only an
    # explicit port, or a host that is this machine or its network, must be the port the app is on.
    direct = parts.port is not None or local or "." not in host
    if listen_port and url_port and direct and url_port != listen_port:
        warnings.append(
            HandlerWarning(code="port_mismatch", host=host, url_port=url_port, listen_port=listen_port)
        )
    return warnings


def _is_private(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost") or host.endswith(".local"):
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return not address.is_global


def log_handler_warnings(handler_url: str, warnings: list[HandlerWarning]) -> None:
    """The startup log's version of the status page's warnings (English: the log is)."""
    for warning in warnings:
        logger.warning("Robot handler %s: %s", handler_url, describe(warning))


def describe(warning: HandlerWarning) -> str:
    """One warning as an English sentence that says what to do."""
    if warning.code == "dotless_host":
        return (
            f"the host {warning.host!r} has no domain, so Bitrix24's servers cannot resolve it. "
            "Set APP_BASE_URL to a public https address and reinstall the app."
        )
    if warning.code == "private_address":
        return (
            f"{warning.host} is a private address that Bitrix24's servers cannot reach (unless your "
            "portal is self-hosted on the same network). Set APP_BASE_URL to a public https address "
            "and reinstall the app."
        )
    if warning.code == "plain_http":
        return (
            "plain http: robot calls and their tokens travel unencrypted. Put the app behind "
            "https and set APP_BASE_URL to the https address."
        )
    return (
        f"APP_BASE_URL names port {warning.url_port}, but the app listens on port {warning.listen_port}. "
        "Set APP_BASE_URL (or PORT) so that they match, then restart and reinstall the app."
    )
