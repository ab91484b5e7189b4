"""The bodies the portal would send to the app: install, robot call, update, uninstall, redirect."""

from __future__ import annotations

import copy
import secrets
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode, urlsplit

from tests.fake_portal.php import build_php_query
from tests.fake_portal.state import (
    SCOPE,
    TIMEOUT_DURATIONS,
    VARIED,
    FakePortalConfig,
    _Grant,
    _new_event_token,
    _new_workflow_id,
    _State,
    _TokenPair,
)


class _PortalBodies:
    """FakePortal's builders of what the portal would send to the app."""

    if TYPE_CHECKING:  # provided by FakePortal and _PortalControls
        config: FakePortalConfig
        _state: _State

        @property
        def domain(self) -> str: ...

        @property
        def client_endpoint(self) -> str: ...

        @property
        def application_token(self) -> str: ...

    # -- bodies the portal would send to the app ---------------------------------------------

    def _auth_block(self, pair: _TokenPair | None, application_token: str | None) -> dict[str, Any]:
        """Event ``auth[...]`` in the order captured from real portals (wire doc 1.2, 1.5)."""
        app_token = application_token or self.application_token
        if pair is None:  # ONAPPUNINSTALL carries exactly these five keys
            return {
                "domain": self.domain,
                "server_endpoint": self._state.server_endpoint,
                "client_endpoint": self.client_endpoint,
                "member_id": self.config.member_id,
                "application_token": app_token,
            }
        return {
            "access_token": pair.access_token,
            "expires": pair.expires,
            "expires_in": int(self.config.access_ttl),
            "scope": SCOPE,
            "domain": self.domain,
            "server_endpoint": self._state.server_endpoint,
            "status": "L",
            "client_endpoint": self.client_endpoint,
            "member_id": self.config.member_id,
            "user_id": pair.user_id,
            "refresh_token": pair.refresh_token,
            "application_token": app_token,
        }

    def install_event_body(self, *, application_token: str | None = None, user_id: int = 1) -> str:
        """ONAPPINSTALL (wire doc 1.2); a given application_token becomes the portal's token."""
        if application_token is not None:
            with self._state.lock:
                self._state.app_token = application_token
        pair = self._state.issue_tokens(user_id)
        data = {"VERSION": "1", "ACTIVE": "Y", "INSTALLED": "Y", "LANGUAGE_ID": self.config.language}
        return build_php_query(
            [
                ("event", "ONAPPINSTALL"),
                ("data", data),
                ("ts", str(int(time.time()))),
                ("auth", self._auth_block(pair, None)),
            ]
        )

    def iframe_install(self, *, user_id: int = 1) -> tuple[str, str]:
        """(query string, form body) of the UI install / app-page POST (wire doc 1.4)."""
        pair = self._state.issue_tokens(user_id)
        query = build_php_query(
            [
                ("DOMAIN", self.domain),
                ("PROTOCOL", "0"),
                ("LANG", self.config.language),
                ("APP_SID", secrets.token_hex(16)),
            ]
        )
        body = build_php_query(
            [
                ("AUTH_ID", pair.access_token),
                ("AUTH_EXPIRES", str(int(self.config.access_ttl))),
                ("REFRESH_ID", pair.refresh_token),
                ("SERVER_ENDPOINT", self._state.server_endpoint),
                ("APPLICATION_TOKEN", self.application_token),
                ("APPLICATION_SCOPE", SCOPE),
                ("member_id", self.config.member_id),
                ("status", "L"),
                ("PLACEMENT", "DEFAULT"),
                ("PLACEMENT_OPTIONS", "{}"),
            ]
        )
        return query, body

    def _robot_user(self, code: str) -> tuple[int, bool]:
        """Whose token the call carries and whether the workflow waits (robot's settings)."""
        with self._state.lock:
            robot = copy.deepcopy(self._state.robots.get(code, {}))
        raw_user = str(robot.get("AUTH_USER_ID") or "")
        user_id = int(raw_user) if raw_user.isdigit() else self.config.admin_user_id
        waits = str(robot.get("USE_SUBSCRIPTION") or "Y").upper() != "N"  # empty means wait
        return user_id, waits

    def _robot_properties(self, code: str, given: Mapping[str, Any]) -> dict[str, Any]:
        """`properties[...]` as the portal fills them: every registered input, nothing else.

        bizproc/classes/general/restactivity.php `execute()` sends each of the robot's PROPERTIES:
        the designer's value (its `Default` when never set, `''` when empty) after
        FieldType::externalizeValue, which leaves a `select` its option key and a `user` its
        internal `user_<id>` form (bizproc/lib/basetype/select.php, user.php). Keys in `given` that
        the robot does not have are passed on too, after the registered ones: a real portal never
        sends them, but tests forge such bodies on purpose. A robot this portal does not know gets
        `given` unchanged.
        """
        with self._state.lock:
            registered = copy.deepcopy(self._state.robots.get(code, {}).get("PROPERTIES"))
        if not isinstance(registered, dict):
            return dict(given)
        values: dict[str, Any] = {}
        for key, descriptor in registered.items():
            default = next((v for k, v in descriptor.items() if k.upper() == "DEFAULT"), None)
            value = given.get(key, default)
            values[key] = "" if value is None else value
        return {**values, **{key: value for key, value in given.items() if key not in values}}

    def robot_call_body(
        self,
        properties: Mapping[str, Any],
        *,
        code: str = "create_contact",
        document_id: tuple[str, str, str] = ("crm", "CCrmDocumentDeal", "DEAL_4521"),
        timeout_duration: int | None = VARIED,
        event_token: str | None = None,
        application_token: str | None = None,
        use_subscription: str | None = None,
    ) -> tuple[str, str]:
        """(event_token, body) of a robot invocation (wire doc 6.3); the token is then pending.

        Re-using an ``event_token`` models a redelivery: an already answered token stays
        answered, so a second ``bizproc.event.send`` is accepted and dropped. ``use_subscription``
        is the robot's "wait for the answer" switch as the workflow's author set it in the
        designer (restactivity.php: the `UseSubscription` property, defaulting to the robot's
        USE_SUBSCRIPTION); with "N" the workflow goes on at once and waits for nothing.
        ``timeout_duration`` None leaves the field out; by default calls cycle through
        ``TIMEOUT_DURATIONS``.
        """
        if timeout_duration == VARIED:
            with self._state.lock:
                timeout_duration = TIMEOUT_DURATIONS[self._state.timeouts % len(TIMEOUT_DURATIONS)]
                self._state.timeouts += 1
        workflow_id = event_token.split("|", 1)[0] if event_token else _new_workflow_id()
        token = event_token or _new_event_token(workflow_id)
        user_id, waits = self._robot_user(code)
        if use_subscription is not None:
            waits = use_subscription.upper() == "Y"
        with self._state.lock:
            self._state.issued.add(token)
            if waits and token not in self._state.answers:
                self._state.pending.add(token)
        pair = self._state.issue_tokens(user_id)
        document_type = [document_id[0], document_id[1], document_id[2].rsplit("_", 1)[0]]
        body = build_php_query(
            [
                ("workflow_id", workflow_id),
                ("code", code),
                ("document_id", list(document_id)),
                ("document_type", document_type),
                ("event_token", token),
                ("properties", self._robot_properties(code, properties)),
                ("use_subscription", "Y" if waits else "N"),
                ("timeout_duration", timeout_duration),
                ("ts", str(int(time.time()))),
                ("auth", self._auth_block(pair, application_token)),
            ]
        )
        return token, body

    def update_event_body(
        self, *, application_token: str | None = None, user_id: int = 1, version: str = "2"
    ) -> str:
        """ONAPPUPDATE as `api-reference/common/events/on-app-update.md` documents it.

        The portal also does what an update does: the core's `onRestAppUpdate` deletes the app's
        robots (bizproc/lib/restservice.php; `bizproc-robot-delete.md`: "When the application is
        deleted or updated, the associated robots are removed"). A given application_token
        becomes the portal's new one (`security-recommendations.md`: update the stored value
        "if Bitrix24 has provided a new application_token").
        """
        with self._state.lock:
            self._state.robots.clear()
            if application_token is not None:
                self._state.app_token = application_token
        pair = self._state.issue_tokens(user_id)
        auth = self._auth_block(pair, None)
        auth.pop("expires")  # the documented ONAPPUPDATE auth block has no `expires` ...
        auth.pop("user_id")  # ... and no `user_id`
        data = {"VERSION": version, "PREVIOUS_VERSION": "1", "LANGUAGE_ID": self.config.language}
        return build_php_query(
            [("event", "ONAPPUPDATE"), ("data", data), ("ts", str(int(time.time()))), ("auth", auth)]
        )

    def uninstall_event_body(self, *, application_token: str | None = None, revoke: bool = True) -> str:
        """ONAPPUNINSTALL without tokens (wire doc 1.5).

        With ``revoke`` (default) the portal also does what uninstalling does: every token dies
        and the app's robots, event handlers and waiting workflows disappear.
        """
        if revoke:
            with self._state.lock:
                self._state.revoke_all()
                self._state.robots.clear()
                self._state.events.clear()
                self._state.pending.clear()
        return build_php_query(
            [
                ("event", "ONAPPUNINSTALL"),
                ("data", {"LANGUAGE_ID": self.config.language, "CLEAN": "1"}),
                ("ts", str(int(time.time()))),
                ("auth", self._auth_block(None, application_token)),
            ]
        )

    def authorize_redirect(self, state: str) -> str:
        """Where /oauth/authorize/ sends the browser, with a fresh code (wire doc 2.3)."""
        code = secrets.token_hex(16)
        with self._state.lock:
            expires_at = time.time() + self.config.code_ttl
            self._state.codes[code] = _Grant(self.config.admin_user_id, expires_at)
        # The token endpoint lives on this same server, so it is also the "server_domain".
        query = urlencode(
            [
                ("code", code),
                ("state", state),
                ("domain", self.domain),
                ("member_id", self.config.member_id),
                ("scope", SCOPE),
                ("server_domain", urlsplit(self._state.server_endpoint).netloc),
            ]
        )
        separator = "&" if "?" in self.config.redirect_uri else "?"
        return f"{self.config.redirect_uri}{separator}{query}"
