"""Security headers of the HTML pages, in one place, whatever produces the HTML.

The pages are shown inside the portal's frame, so there is no `X-Frame-Options`; instead the
`Content-Security-Policy` names who may frame them: the installed portal(s), or the configured
one, and nothing else. `Referrer-Policy: no-referrer` keeps the OAuth `code` in `/app?code=...`
out of the `Referer` of anything the page loads. Every reply gets `X-Content-Type-Options:
nosniff`, so no browser reads a JSON error as a page.
"""

from collections.abc import Awaitable, Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

NOSNIFF = (b"x-content-type-options", b"nosniff")
NO_REFERRER = (b"referrer-policy", b"no-referrer")
FrameOrigins = Callable[[], Awaitable[list[str]]]


def content_security_policy(origins: list[str]) -> str:
    ancestors = " ".join(origins) if origins else "'none'"
    return f"frame-ancestors {ancestors}; base-uri 'none'; object-src 'none'"


class PageHeadersMiddleware:
    """Adds the headers above as the reply starts; the portal origins come from the lifespan's service."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        service = scope.get("state", {}).get("service")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", []), NOSNIFF]
                if _is_html(headers) and service is not None:
                    policy = content_security_policy(await service.frame_origins())
                    headers += [(b"content-security-policy", policy.encode()), NO_REFERRER]
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _is_html(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(name == b"content-type" and value.startswith(b"text/html") for name, value in headers)
