"""Bizproc REST methods: robots, event bindings, bizproc.event.send and the activity log."""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from tests.fake_portal.methods_app import _Call, _require_admin, _validation
from tests.fake_portal.state import PortalError

_CODE_RE = re.compile(r"[A-Za-z0-9._-]+")
_PROPERTY_KEY_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


def _check_code(code: Any) -> str:
    if not code:
        raise _validation("Empty activity code!")
    if not isinstance(code, str) or not _CODE_RE.fullmatch(code):
        raise _validation("Wrong activity code!")
    return code


def _check_url(url: Any) -> None:
    """The core's `Bitrix\\Rest\\HandlerHelper::checkCallback` (rest/lib/handlerhelper.php), which
    `bizproc.robot.add`/`update` (restservice.php, validateActivityHandler) and `event.bind` use:
    the host must contain a dot after its first character (`strpos($host, '.') > 0`), so
    `localhost` or `myserver` is refused; only then is the scheme checked.
    """
    try:
        host = urlsplit(str(url)).hostname or ""
    except ValueError:
        host = ""
    if host.find(".") <= 0:
        raise PortalError(400, "ERROR_WRONG_HANDLER_URL", "Wrong handler URL")
    if urlsplit(str(url)).scheme not in ("http", "https"):
        raise PortalError(400, "ERROR_UNSUPPORTED_PROTOCOL", "Unsupported handler protocol")


def _check_properties(properties: Any) -> None:
    if not properties:  # omitted, "" or PHP's empty array `[]`
        return
    if not isinstance(properties, dict):
        raise _validation("Wrong properties array!")
    for key, descriptor in properties.items():
        if not _PROPERTY_KEY_RE.fullmatch(key):
            raise _validation(f"Wrong property key {key}!")
        if not isinstance(descriptor, dict) or not _property_name(descriptor):
            raise _validation(f"Empty property NAME {key}!")


def _property_name(descriptor: Mapping[str, Any]) -> Any:
    # Descriptor keys are documented Capitalized (`Name`), but the portal upper-cases them.
    return next((value for key, value in descriptor.items() if key.upper() == "NAME"), None)


def _check_robot_fields(fields: Mapping[str, Any], *, partial: bool) -> None:
    if "HANDLER" in fields or not partial:
        if not fields.get("HANDLER"):
            raise _validation("Empty activity HANDLER!")
        _check_url(fields["HANDLER"])
    if ("NAME" in fields or not partial) and not fields.get("NAME"):
        raise _validation("Empty activity NAME!")
    for key in ("PROPERTIES", "RETURN_PROPERTIES"):
        _check_properties(fields.get(key))
    document_type = fields.get("DOCUMENT_TYPE")
    if document_type and not (isinstance(document_type, list) and len(document_type) == 3):
        raise _validation("Wrong activity DOCUMENT_TYPE!")


def _robot_add(call: _Call) -> Any:
    _require_admin(call)
    fields = {key.upper(): value for key, value in call.params.items() if key != "auth"}
    if not fields:
        raise _validation("Empty data!")
    code = _check_code(fields.get("CODE"))
    _check_robot_fields(fields, partial=False)
    if code in call.state.robots:
        raise PortalError(400, "ERROR_ACTIVITY_ALREADY_INSTALLED", "Activity or Robot already installed!")
    # restservice.php addActivityInternal: `(int) $params['AUTH_USER_ID']`, 0 when absent.
    fields["AUTH_USER_ID"] = _php_int(fields.get("AUTH_USER_ID"))
    call.state.robots[code] = copy.deepcopy(fields)
    return True


def _php_int(value: Any) -> int:
    text = str(value or "").strip()
    return int(text) if text.isdigit() else 0


def _existing_robot(call: _Call) -> str:
    _require_admin(call)
    code = _check_code(call.param("code"))
    if code not in call.state.robots:
        raise PortalError(400, "ERROR_ACTIVITY_NOT_FOUND", "Activity or Robot not found!")
    return code


def _robot_update(call: _Call) -> Any:
    code = _existing_robot(call)
    fields = call.param("fields")
    if not isinstance(fields, dict) or not fields:
        raise _validation("No fields to update")
    updates = {key.upper(): value for key, value in fields.items()}
    _check_robot_fields(updates, partial=True)
    if "AUTH_USER_ID" in updates:
        updates["AUTH_USER_ID"] = _php_int(updates["AUTH_USER_ID"])
    call.state.robots[code].update(copy.deepcopy(updates))
    return True


def _robot_list(call: _Call) -> Any:
    _require_admin(call)
    return list(call.state.robots)


def _robot_delete(call: _Call) -> Any:
    del call.state.robots[_existing_robot(call)]
    return True


# -- event.* ---------------------------------------------------------------------------------


def _required_argument(call: _Call, name: str) -> str:
    value = call.param(name)
    if not value or not isinstance(value, str):
        raise PortalError(400, "ERROR_ARGUMENT", f"Argument '{name.upper()}' is null or empty")
    return value


def _event_bind(call: _Call) -> Any:
    _require_admin(call)
    event = _required_argument(call, "event").upper()
    handler = _required_argument(call, "handler")
    _check_url(handler)
    if any(e["event"] == event and e["handler"] == handler for e in call.state.events):
        raise PortalError(400, "ERROR_HANDLER_ALREADY_EXIST", "Handler already exists!")
    auth_type = str(call.param("auth_type") or 0)
    call.state.events.append({"event": event, "handler": handler, "auth_type": auth_type, "offline": 0})
    return True


def _event_get(call: _Call) -> Any:
    _require_admin(call)
    return copy.deepcopy(call.state.events)


def _event_unbind(call: _Call) -> Any:
    _require_admin(call)
    event = _required_argument(call, "event").upper()
    handler = call.param("handler")
    keep = [e for e in call.state.events if e["event"] != event or handler not in (None, e["handler"])]
    removed = len(call.state.events) - len(keep)
    call.state.events[:] = keep
    return {"count": removed}


# -- crm.contact.* and crm.duplicate.findbycomm (wire doc 8) ----------------------------------


def _signed_token(call: _Call) -> str:
    """The core refuses only a token whose signature fails: bizproc/lib/restservice.php,
    extractEventToken() -> CBPRestActivity::extractToken() (Signer::unsign with the salt
    'bizproc', bizproc/classes/general/restactivity.php) -> AccessException, which the REST
    server answers with 403 ACCESS_DENIED "Access denied!".
    """
    token = call.param("event_token")
    if not isinstance(token, str) or token not in call.state.issued:
        raise PortalError(403, "ACCESS_DENIED", "Access denied!")
    return token


def _event_send(call: _Call) -> Any:
    """restservice.php sendEvent(): a signed token is answered `true` at once; the event then
    reaches the activity (CBPRestActivity::onExternalEvent), which ignores it silently when it
    is already closed: answered before, timed out, or never waiting (use_subscription N).
    """
    token = _signed_token(call)
    return_values = call.param("return_values")
    answer = {
        "return_values": copy.deepcopy(return_values) if return_values not in (None, "", []) else {},
        "log_message": str(call.param("log_message") or ""),
    }
    if token in call.state.pending:
        call.state.pending.discard(token)
        call.state.answers[token] = answer
    else:
        call.state.dropped.append({"event_token": token, **answer})
    return True


def _activity_log(call: _Call) -> Any:
    token = _signed_token(call)
    if token not in call.state.pending:
        return True  # same path as sendEvent: a closed activity ignores it
    message = str(call.param("log_message") or "")
    call.state.activity_log.append({"event_token": token, "log_message": message})
    return True
