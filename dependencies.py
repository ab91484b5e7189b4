"""Named dependencies: the lifespan's shared objects, the settings, and parsed callback bodies."""

from typing import Annotated, Any, TypedDict, TypeVar

from fastapi import Depends, Request
from pydantic import BaseModel, ValidationError

from config import Settings, get_settings
from schemas import (
    AppFrame,
    IframeInstall,
    InstallEvent,
    RobotCall,
    UninstallEvent,
    UpdateEvent,
    parse_php_form,
)
from services.body_guard import BodyLimits
from services.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from services.processing import ProcessingService

MAX_BODY_BYTES = 1024 * 1024
FORM_TYPE = "application/x-www-form-urlencoded"
Model = TypeVar("Model", bound=BaseModel)


class AppState(TypedDict):
    """What the lifespan builds once and every request shares."""

    service: ProcessingService
    body_limits: BodyLimits


SettingsDep = Annotated[Settings, Depends(get_settings)]


def processing_service(request: Request) -> ProcessingService:
    """Built once in the lifespan (it holds no per-request state)."""
    # The lifespan state straight from the scope: `request.state` wraps it in a new object first.
    service: ProcessingService = request.scope["state"]["service"]
    return service


async def get_processing_service(request: Request) -> ProcessingService:
    """The service as a dependency; tests may override it."""
    return processing_service(request)


ProcessingServiceDep = Annotated[ProcessingService, Depends(get_processing_service)]


async def read_form(request: Request) -> dict[str, Any]:
    """The body as Bitrix24 sends it (form-encoded, PHP bracket keys), at most 1 MB."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != FORM_TYPE:
        shown = content_type or "no content type"
        raise UnsupportedMediaType(f"Expected {FORM_TYPE}, as Bitrix24 sends it; got {shown}.")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise PayloadTooLarge("The body is larger than 1 MB.")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise PayloadTooLarge("The body is larger than 1 MB.")
    return parse_php_form(bytes(body))


FormDep = Annotated[dict[str, Any], Depends(read_form)]


def validated(model: type[Model], data: dict[str, Any], what: str) -> Model:
    """The data as `model`, or BadRequest naming the fields that are wrong."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or 'body'}: {error['msg']}"
            for error in exc.errors()[:5]
        )
        raise BadRequest(f"Not a valid {what}: {problems}") from exc


async def robot_call_form(request: Request) -> RobotCall:
    """The robot call in the body; called by the route itself (see router.robot)."""
    form = await read_form(request)
    if "event_token" not in form:
        raise BadRequest("Not a robot call: the body has no event_token.")
    return validated(RobotCall, form, "robot call")


async def install_form(request: Request, form: FormDep) -> InstallEvent | IframeInstall:
    if "event" in form:
        return validated(InstallEvent, form, "ONAPPINSTALL event")
    if "AUTH_ID" in form:
        # The frame install puts DOMAIN and PROTOCOL in the query string, the tokens in the body.
        keys = ("DOMAIN", "PROTOCOL", "LANG")
        query = {key: request.query_params[key] for key in keys if key in request.query_params}
        return validated(IframeInstall, {**form, **query}, "install request")
    raise BadRequest(
        "Not an install request: expected an ONAPPINSTALL event or the portal's install page POST."
    )


async def app_frame_form(request: Request) -> AppFrame | None:
    """The portal's frame POST, if that is what this is; anything else shows the public page."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != FORM_TYPE:
        return None
    form = await read_form(request)
    # DOMAIN, PROTOCOL and LANG come in the query string (wire doc 1.4); the docs show LANG in the
    # POST array too (b24restdocs `settings/oauth/simple-way.md`): the query wins, the body will do.
    keys = ("DOMAIN", "PROTOCOL", "LANG")
    query = {key: request.query_params[key] for key in keys if key in request.query_params}
    try:
        return AppFrame.model_validate({**form, **query})
    except ValidationError:
        return None


async def uninstall_form(form: FormDep) -> UninstallEvent:
    return validated(UninstallEvent, form, "ONAPPUNINSTALL event")


async def update_form(form: FormDep) -> UpdateEvent:
    return validated(UpdateEvent, form, "ONAPPUPDATE event")


InstallDep = Annotated[InstallEvent | IframeInstall, Depends(install_form)]
UninstallDep = Annotated[UninstallEvent, Depends(uninstall_form)]
UpdateDep = Annotated[UpdateEvent, Depends(update_form)]
AppFrameDep = Annotated[AppFrame | None, Depends(app_frame_form)]
