"""The OAuth authorization server's token grants (wire doc 2)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tests.fake_portal.state import PortalError, _State

# --------------------------------------------------------------------------------------------
# OAuth authorization server (wire doc 2)
# --------------------------------------------------------------------------------------------


def _grant_tokens(state: _State, params: Mapping[str, str]) -> dict[str, Any]:
    failure = state.take_failure("oauth.token")
    if failure is not None:
        raise failure
    grant_type = params.get("grant_type", "")
    missing = [k for k in ("grant_type", "client_id", "client_secret") if not params.get(k)]
    if missing:
        raise PortalError(400, "invalid_request", f"Missing parameter: {', '.join(missing)}")
    config = state.config
    if params["client_id"] != config.client_id or params["client_secret"] != config.client_secret:
        raise PortalError(401, "invalid_client", "Invalid client_id or client_secret")
    if grant_type not in ("authorization_code", "refresh_token"):
        raise PortalError(400, "invalid_request", f"Unsupported grant_type {grant_type!r}")
    secret_name = "code" if grant_type == "authorization_code" else "refresh_token"
    secret = params.get(secret_name)
    if not secret:
        raise PortalError(400, "invalid_request", f"Missing parameter: {secret_name}")
    if grant_type == "authorization_code":
        user_id = state.consume_code(secret)
        state.stats["code_exchanges"] += 1
    else:
        user_id = state.rotate_refresh(secret)
        state.stats["refreshes"] += 1
    return state.token_response(state.issue_tokens(user_id))
