"""The REST call record and the app and user methods: app.info, profile, user.admin."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tests.fake_portal.state import PortalError, _State

# --------------------------------------------------------------------------------------------
# REST methods: each takes a _Call and returns the `result` value or raises PortalError
# --------------------------------------------------------------------------------------------


@dataclass
class _Call:
    state: _State
    user_id: int
    params: dict[str, Any]  # top-level keys already lower-cased (wire doc 3.2)

    def param(self, name: str) -> Any:
        return self.params.get(name.lower())

    @property
    def is_admin(self) -> bool:
        return self.user_id == self.state.config.admin_user_id


def _validation(description: str) -> PortalError:
    return PortalError(400, "ERROR_ACTIVITY_VALIDATION_FAILURE", description)


def _require_admin(call: _Call) -> None:
    if not call.is_admin:
        raise PortalError(400, "ACCESS_DENIED", "Access denied!")


def _app_info(call: _Call) -> Any:
    return {
        "ID": 7,
        "CODE": call.state.config.client_id,
        "VERSION": 1,
        "STATUS": "L",
        "INSTALLED": True,
        "PAYMENT_EXPIRED": "N",
        "DAYS": None,
        "LANGUAGE_ID": "ru",
        "LICENSE": "ru_project",
    }


def _profile(call: _Call) -> Any:
    return {"ID": str(call.user_id), "ADMIN": call.is_admin, "NAME": f"User {call.user_id}"}


def _user_admin(call: _Call) -> Any:
    return call.is_admin


# -- bizproc.robot.* (wire doc 5) ------------------------------------------------------------
