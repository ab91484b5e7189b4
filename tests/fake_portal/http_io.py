"""The HTTP layer's helpers: request bodies read as the portal reads them, error replies."""

from __future__ import annotations

import json
from email import policy
from email.parser import BytesParser
from typing import Any
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import JSONResponse

from tests.fake_portal.batch import _lower_keys
from tests.fake_portal.php import parse_php_query
from tests.fake_portal.state import PortalError

# --------------------------------------------------------------------------------------------
# HTTP layer
# --------------------------------------------------------------------------------------------


def _multipart_pairs(content_type: str, body: bytes) -> list[tuple[str, str]]:
    # The stdlib MIME parser avoids a python-multipart dependency; file parts are ignored.
    head = f"Content-Type: {content_type}\r\n\r\n".encode()
    message = BytesParser(policy=policy.HTTP).parsebytes(head + body)
    pairs: list[tuple[str, str]] = []
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        content = part.get_content()
        if isinstance(name, str) and part.get_filename() is None and isinstance(content, str):
            pairs.append((name, content))
    return pairs


async def _read_body(request: Request) -> dict[str, Any]:
    body = await request.body()
    if not body.strip():
        return {}
    content_type = request.headers.get("content-type", "")
    if "json" in content_type.lower():
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise PortalError(400, "INVALID_REQUEST", "Request body is not a JSON object")
        return data
    if content_type.lower().startswith("multipart/"):
        return parse_php_query(_multipart_pairs(content_type, body))
    return parse_php_query(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))


async def _read_params(request: Request) -> dict[str, Any]:
    """Query string and body merged, top-level names lower-cased (wire doc 3.2)."""
    params = _lower_keys(parse_php_query(parse_qsl(request.url.query, keep_blank_values=True)))
    if request.method == "POST":
        params.update(_lower_keys(await _read_body(request)))
    return params


async def _read_flat(request: Request) -> dict[str, str]:
    params = dict(parse_qsl(request.url.query, keep_blank_values=True))
    if request.method == "POST":
        body = (await request.body()).decode("utf-8", "replace")
        params.update(parse_qsl(body, keep_blank_values=True))
    return params


async def _json_object(request: Request) -> dict[str, Any]:
    body = await request.body()
    data = json.loads(body) if body.strip() else {}
    return data if isinstance(data, dict) else {}


def _error_response(error: PortalError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)
