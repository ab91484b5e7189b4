"""HTTP routes: parse (via dependencies), call one service method, answer."""

from typing import Annotated

from fastapi import APIRouter, Cookie, Header, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from dependencies import (
    AppFrameDep,
    InstallDep,
    ProcessingServiceDep,
    SettingsDep,
    UninstallDep,
    UpdateDep,
    processing_service,
    robot_call_form,
)
from schemas import Health, InstallEvent, RobotAck
from services import messages, metrics, pages

router = APIRouter()
NONCE_COOKIE = "b24_oauth_nonce"
NonceCookie = Annotated[str | None, Cookie(alias=NONCE_COOKIE)]
AcceptLanguage = Annotated[str | None, Header()]


# First: routes are matched in order, and robot calls are by far the most frequent.
@router.post("/robot", response_model=RobotAck)
async def robot(request: Request) -> Response:
    """The robot handler: acknowledge at once; the contact and the answer follow from the queue."""
    # The form and the service are read here, not declared as dependencies: on the busiest route,
    # FastAPI's dependency solving cost more than parsing the whole body (bench/profile_ack.py).
    call = await robot_call_form(request)
    ack = await processing_service(request).accept_robot_call(call)
    # Serialised here: FastAPI's generic response path costs more than the whole model.
    return Response(ack.json_bytes(), media_type="application/json")


@router.post("/install", response_model=None)
async def install(payload: InstallDep, service: ProcessingServiceDep) -> Response:
    """Install the app on a portal: store its tokens, register the robot."""
    if isinstance(payload, InstallEvent):
        done = await service.install_from_event(payload)
        record = done.record
        body = {
            "status": "installed",
            "member_id": record.member_id,
            "domain": record.domain,
            "robot": done.robot,
        }
        return JSONResponse(body)
    done = await service.install_from_frame(payload)
    lang = messages.portal_language(payload.LANG) or "en"
    return HTMLResponse(pages.install_finish_page(done.record.domain, done.robot, lang))


@router.get("/oauth/login")
async def oauth_login(
    service: ProcessingServiceDep, settings: SettingsDep, domain: str | None = None
) -> RedirectResponse:
    """Start the OAuth authorization-code grant at the portal."""
    redirect = await service.start_login(domain)
    response = RedirectResponse(redirect.url, status_code=302)
    secure = settings.app_base_url.startswith("https://")
    response.set_cookie(
        NONCE_COOKIE, redirect.browser_nonce, max_age=600, httponly=True, samesite="lax", secure=secure
    )
    return response


@router.get("/oauth/callback")
async def oauth_callback(
    service: ProcessingServiceDep,
    nonce: NonceCookie = None,
    code: str | None = None,
    state: str | None = None,
    server_domain: str | None = None,
) -> HTMLResponse:
    """OAuth redirect target: check state, exchange the code at the portal's server, store the tokens."""
    record = await service.finish_login(code, state, nonce, server_domain)
    response = HTMLResponse(pages.message_page("Authorized", f"The app is connected to {record.domain}."))
    response.delete_cookie(NONCE_COOKIE)
    return response


@router.get("/")
async def root() -> RedirectResponse:
    """The app's own address leads to its status page."""
    return RedirectResponse("/app", status_code=303)


@router.get("/app")
async def app_page(
    request: Request,
    service: ProcessingServiceDep,
    accept_language: AcceptLanguage = None,
    nonce: NonceCookie = None,
    code: str | None = None,
    state: str | None = None,
    server_domain: str | None = None,
) -> HTMLResponse:
    """The app's handler path: the OAuth callback when `code` is present, else the status page."""
    if code is not None or state is not None:
        return await oauth_callback(service, nonce, code, state, server_domain)
    report = await service.status_report(None, accept_language, _listen_port(request))
    return HTMLResponse(pages.status_page(report))


@router.post("/app")
async def app_frame(
    request: Request,
    frame: AppFrameDep,
    service: ProcessingServiceDep,
    accept_language: AcceptLanguage = None,
) -> HTMLResponse:
    """The app opened inside the portal: its status page, in full for that portal's users."""
    report = await service.status_report(frame, accept_language, _listen_port(request))
    return HTMLResponse(pages.status_page(report))


def _listen_port(request: Request) -> int | None:
    # The port of the socket this request came in on: the one the app really listens on.
    server = request.scope.get("server")
    return int(server[1]) if server and server[1] else None


@router.post("/uninstall")
async def uninstall(event: UninstallDep, service: ProcessingServiceDep) -> dict[str, str]:
    """ONAPPUNINSTALL: forget the portal's tokens."""
    await service.uninstall(event)
    return {"status": "uninstalled"}


@router.get("/metrics")
async def prometheus_metrics(service: ProcessingServiceDep) -> Response:
    """Prometheus metrics: robot calls, the queue, REST requests, token refreshes, acknowledgements."""
    health = await service.health()
    body = metrics.render(health.queue, health.portal_connected)
    return Response(body, media_type=metrics.CONTENT_TYPE)


@router.post("/update")
async def update(event: UpdateDep, service: ProcessingServiceDep) -> dict[str, str]:
    """ONAPPUPDATE: the portal deleted the app's robot; register it again."""
    done = await service.update_from_event(event)
    return {"status": "updated", "robot": done.robot}


@router.get("/health", response_model=Health, responses={503: {"model": Health}})
async def health(service: ProcessingServiceDep) -> JSONResponse:
    """ "ok", "degraded" (200) or "down" (503, robot calls cannot be accepted), with the reasons."""
    report = await service.health()
    status_code = 503 if report.status == "down" else 200
    return JSONResponse(report.model_dump(mode="json"), status_code=status_code)
