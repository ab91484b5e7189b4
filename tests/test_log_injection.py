"""Values from a request never forge a log line: control characters in them are escaped."""

import io
import re
from urllib.parse import quote

import httpx
import pytest

from services.observability import configure_logging
from tests.conftest import post_form
from tests.fake_portal import FakePortal

pytestmark = pytest.mark.anyio

FORGED = "2026-01-01 00:00:00,000 INFO    services.processing [req=x] Robot call accepted as job 1"
LINE_START = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ")


@pytest.fixture
def log() -> io.StringIO:
    """The app's console log from here on (its own handler and formatter, into a buffer)."""
    stream = io.StringIO()
    configure_logging("INFO", stream)
    return stream


def _replace(body: str, key: str, value: str) -> str:
    pairs = [pair for pair in body.split("&") if not pair.startswith(quote(key, safe="") + "=")]
    return "&".join([*pairs, f"{quote(key, safe='')}={quote(value, safe='')}"])


@pytest.mark.parametrize("key", ["workflow_id", "auth[domain]", "auth[member_id]"])
async def test_a_newline_in_a_request_value_does_not_start_a_log_line(
    installed: httpx.AsyncClient, portal: FakePortal, log: io.StringIO, key: str
) -> None:
    _, body = portal.robot_call_body({"first_name": "Anna"})

    response = await post_form(installed, "/robot", _replace(body, key, f"x\r\n{FORGED}\x1b[2J"))

    assert response.status_code in (200, 400, 401, 403)
    lines = log.getvalue().splitlines()
    assert lines, "the call was logged"
    assert not [line for line in lines if line.startswith(FORGED)]
    assert all(LINE_START.match(line) or line.startswith((" ", "Traceback")) for line in lines), lines
    assert not any("\x1b" in line for line in lines)


async def test_a_genuine_call_is_logged_as_before(
    installed: httpx.AsyncClient, portal: FakePortal, log: io.StringIO
) -> None:
    _, body = portal.robot_call_body({"first_name": "Анна"})

    response = await post_form(installed, "/robot", body)

    assert response.status_code == 200
    assert "Robot call accepted as job" in log.getvalue()
