"""The JSON control API under /_fake/ that drives and inspects the portal from another process."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.fake_portal.http_io import _json_object

if TYPE_CHECKING:
    from tests.fake_portal.server import FakePortal


class _ControlApi:
    """JSON endpoints under /_fake/ so another process can drive and inspect the portal."""

    def __init__(self, portal: FakePortal) -> None:
        self.portal = portal

    def routes(self) -> list[Route]:
        get, post = ["GET"], ["POST"]
        return [
            Route("/_fake/stats", self.stats, methods=get),
            Route("/_fake/answers", self.answers, methods=get),
            Route("/_fake/contacts", self.contacts, methods=get),
            Route("/_fake/robots", self.robots, methods=get),
            Route("/_fake/events", self.events, methods=get),
            Route("/_fake/install-body", self.install_body, methods=post),
            Route("/_fake/iframe-install", self.iframe_install, methods=post),
            Route("/_fake/uninstall-body", self.uninstall_body, methods=post),
            Route("/_fake/update-body", self.update_body, methods=post),
            Route("/_fake/robot-body", self.robot_body, methods=post),
            Route("/_fake/authorize-redirect", self.authorize_redirect, methods=post),
            Route("/_fake/hold", self.hold, methods=post),
            Route("/_fake/release", self.release, methods=post),
            Route("/_fake/expire-tokens", self.expire_tokens, methods=post),
            Route("/_fake/rate-limit", self.rate_limit, methods=post),
            Route("/_fake/fail-next", self.fail_next, methods=post),
        ]

    async def stats(self, request: Request) -> Response:
        portal = self.portal
        return JSONResponse({**portal.stats, **portal.counts(), "recent_errors": portal.recent_errors})

    async def answers(self, request: Request) -> Response:
        return JSONResponse(self.portal.answers)

    async def contacts(self, request: Request) -> Response:
        return JSONResponse(self.portal.contacts)

    async def robots(self, request: Request) -> Response:
        return JSONResponse(self.portal.robots)

    async def events(self, request: Request) -> Response:
        return JSONResponse(self.portal.bound_events)

    async def install_body(self, request: Request) -> Response:
        data = await _json_object(request)
        body = self.portal.install_event_body(
            application_token=data.get("application_token"), user_id=int(data.get("user_id", 1))
        )
        return JSONResponse({"body": body})

    async def iframe_install(self, request: Request) -> Response:
        data = await _json_object(request)
        query, body = self.portal.iframe_install(user_id=int(data.get("user_id", 1)))
        return JSONResponse({"query": query, "body": body})

    async def uninstall_body(self, request: Request) -> Response:
        data = await _json_object(request)
        body = self.portal.uninstall_event_body(
            application_token=data.get("application_token"), revoke=bool(data.get("revoke", True))
        )
        return JSONResponse({"body": body})

    async def update_body(self, request: Request) -> Response:
        data = await _json_object(request)
        body = self.portal.update_event_body(
            application_token=data.get("application_token"), user_id=int(data.get("user_id", 1))
        )
        return JSONResponse({"body": body})

    async def robot_body(self, request: Request) -> Response:
        data = await _json_object(request)
        options: dict[str, Any] = {
            key: data[key] for key in ("code", "event_token", "application_token") if key in data
        }
        if "timeout_duration" in data:
            options["timeout_duration"] = data["timeout_duration"]
        if "document_id" in data:
            options["document_id"] = tuple(data["document_id"])
        if "use_subscription" in data:
            options["use_subscription"] = str(data["use_subscription"])
        token, body = self.portal.robot_call_body(data.get("properties") or {}, **options)
        return JSONResponse({"event_token": token, "body": body})

    async def authorize_redirect(self, request: Request) -> Response:
        data = await _json_object(request)
        return JSONResponse({"location": self.portal.authorize_redirect(str(data.get("state", "")))})

    async def hold(self, request: Request) -> Response:
        self.portal.hold()
        return JSONResponse({"ok": True})

    async def release(self, request: Request) -> Response:
        self.portal.release()
        return JSONResponse({"ok": True})

    async def expire_tokens(self, request: Request) -> Response:
        self.portal.expire_access_tokens()
        return JSONResponse({"ok": True})

    async def rate_limit(self, request: Request) -> Response:
        data = await _json_object(request)
        burst = data.get("burst")
        self.portal.set_rate_limit(None if burst is None else int(burst), float(data["drain"]))
        return JSONResponse({"ok": True})

    async def fail_next(self, request: Request) -> Response:
        data = await _json_object(request)
        self.portal.fail_next(
            str(data["method"]),
            int(data["status"]),
            str(data["error"]),
            str(data.get("description", "")),
            int(data.get("times", 1)),
        )
        return JSONResponse({"ok": True})
