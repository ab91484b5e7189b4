"""Route public host names (`b24-x.bitrix24.ru`, `oauth.bitrix24.tech`) to fake servers on 127.0.0.1.

The app under test talks to the real names, so its host checks run as in production; this
transport sends each request to the fake that plays that host, keeping the `Host` header, and
refuses (and records) any host it was not told about: nothing leaves 127.0.0.1.
"""

from urllib.parse import urlsplit

import httpx


class HostRouting(httpx.AsyncBaseTransport):
    """An httpx transport: `routes` maps a host to the `http://127.0.0.1:port` that plays it."""

    def __init__(self, routes: dict[str, str] | None = None) -> None:
        self.routes = dict(routes or {})
        self.seen: list[str] = []  # every host asked for, routed or not
        self._inner = httpx.AsyncHTTPTransport()

    def route(self, public_url: str, bound_url: str) -> None:
        self.routes[urlsplit(public_url).netloc] = bound_url

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        host = request.url.netloc.decode()
        self.seen.append(host)
        target = self.routes.get(host)
        if target is None and request.url.host != "127.0.0.1":
            raise httpx.ConnectError(f"no route to {host} in tests", request=request)
        if target is not None:
            bound = urlsplit(target)
            request.url = request.url.copy_with(scheme="http", host=bound.hostname, port=bound.port)
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()
