"""The REST method table and the methods only plans with automation rules have."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tests.fake_portal.methods_app import _app_info, _Call, _profile, _user_admin
from tests.fake_portal.methods_bizproc import (
    _activity_log,
    _event_bind,
    _event_get,
    _event_send,
    _event_unbind,
    _robot_add,
    _robot_delete,
    _robot_list,
    _robot_update,
)
from tests.fake_portal.methods_crm import (
    _contact_add,
    _contact_get,
    _contact_list,
    _contact_update,
    _find_by_comm,
)

_METHODS: dict[str, Callable[[_Call], Any]] = {
    "app.info": _app_info,
    "profile": _profile,
    "user.admin": _user_admin,
    "bizproc.robot.add": _robot_add,
    "bizproc.robot.update": _robot_update,
    "bizproc.robot.list": _robot_list,
    "bizproc.robot.delete": _robot_delete,
    "event.bind": _event_bind,
    "event.get": _event_get,
    "event.unbind": _event_unbind,
    "crm.contact.add": _contact_add,
    "crm.contact.get": _contact_get,
    "crm.contact.list": _contact_list,
    "crm.contact.update": _contact_update,
    "crm.duplicate.findbycomm": _find_by_comm,
    "bizproc.event.send": _event_send,
    "bizproc.activity.log": _activity_log,
}


# Only on plans with automation rules (see FakePortalConfig.automation_rules).
_AUTOMATION_METHODS = frozenset(
    name for name in _METHODS if name.startswith("bizproc.robot.") or name.startswith("bizproc.event.")
) | {"bizproc.activity.log"}
