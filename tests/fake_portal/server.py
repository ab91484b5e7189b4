"""The HTTP server: FakePortal's addresses, lifecycle and endpoints for REST, OAuth and pages."""

from __future__ import annotations

import asyncio
import html
import socket
import threading
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from tests.fake_portal.batch import _Dispatcher, _method_name, _time_block
from tests.fake_portal.bodies import _PortalBodies
from tests.fake_portal.control_api import _ControlApi
from tests.fake_portal.controls import _PortalControls
from tests.fake_portal.http_io import (
    _error_response,
    _read_flat,
    _read_params,
)
from tests.fake_portal.oauth import _grant_tokens
from tests.fake_portal.state import FakePortalConfig, PortalError, _ListResult, _State


class FakePortal(_PortalBodies, _PortalControls):
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
