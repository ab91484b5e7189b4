"""redact() and configure_logging(): no secret reaches a log line, the context stays readable."""

import io
import logging
import secrets
from collections.abc import Iterator
from typing import Any

import pytest

from services.observability import MASK, configure_logging, redact, register_secret

MEMBER_ID = "a223c6b3710f85df22e9377d6c4f7553"
DOMAIN = "example.bitrix24.ru"
WORKFLOW_ID = "664fa13bbbb410.99176768"
EVENT_TOKEN = (
    f"{WORKFLOW_ID}|A40364_79843_85254_57332|MS1ekdI0CvXi8ycL8qNIn96hak8JEndG."
    "54020ce210345fb6eb12a79d75316d9430b42ccd9c1d82ab1a3bf8b064ec50e9"
)
CONTEXT = f"member_id={MEMBER_ID}&domain={DOMAIN}&workflow_id={WORKFLOW_ID}"


@pytest.mark.parametrize(
    ("line", "secret"),
    [
        ("GET /rest/app.info?access_token=s6p6eclrvim6da22ft9ch94ekreb52lv", "s6p6eclrvim6"),
        ("refresh_token=4s386p3q0tr8dy89xvmt96234v3dljg8", "4s386p3q0tr8"),
        ("auth%5Brefresh_token%5D=4s386p3q0tr8dy89xvmt96234v3dljg8", "4s386p3q0tr8"),
        ("auth%5Baccess_token%5D=s6p6eclrvim6da22ft9ch94ekreb52lv", "s6p6eclrvim6"),
        ("auth[application_token]=51856fefc120afa4b628cc82d3935cce", "51856fefc120"),
        ("auth%5bapplication_token%5d=51856fefc120afa4b628cc82d3935cce", "51856fefc120"),
        (
            '{"client_id": "app.1", "client_secret": "LJSl0lNB76B5YY6u0YVQ3AW0"}',
            "LJSl0lNB76B5",
        ),
        ('{"auth":"4baf4f66006e13540058f18a", "halt": 0}', "4baf4f66006e"),
        ("{'access_token': 'zx81mm02ffe7kd', 'scope': 'crm'}", "zx81mm02ffe7"),
        ("AUTH_ID=ahodg4h37n89vo17gbkgq0x1l825nnb5", "ahodg4h37n89"),
        ("REFRESH_ID=2lg086mxijlpvwh0h7r4nl19udm4try5", "2lg086mxijlp"),
        ("APPLICATION_TOKEN=ec1b2074a9d3f5c81b6e40d27a95cf38", "ec1b2074a9d3"),
        (
            "GET /oauth/callback?code=avmocpghblyi01m3h42bljvqtyd19sw1&state=JJHgsdgfkdaslg7l",
            "avmocpghblyi",
        ),
        ("GET /oauth/callback?code=avmocpghblyi01m3&state=JJHgsdgfkdaslg7lbadsfg", "JJHgsdgfkdas"),
        (f"answering {EVENT_TOKEN}", "MS1ekdI0CvXi"),
        (f"event_token={EVENT_TOKEN.replace('|', '%7C')}", "MS1ekdI0CvXi"),
        (f"bizproc.event.send failed for {EVENT_TOKEN}: ACCESS_DENIED", "54020ce21034"),
    ],
)
def test_secret_shapes_are_masked_and_context_stays(line: str, secret: str) -> None:
    masked = redact(f"{line}&{CONTEXT}")

    assert secret not in masked
    assert MASK in masked
    assert MEMBER_ID in masked
    assert DOMAIN in masked
    assert WORKFLOW_ID in masked


def test_registered_secret_is_masked_anywhere() -> None:
    value = secrets.token_hex(16)
    register_secret(value)

    masked = redact(f"token {value} in prose, in a URL /x/{value}/y and glued:{value}! {CONTEXT}")

    assert value not in masked
    assert masked.count(MASK) == 3
    assert MEMBER_ID in masked


def test_short_and_empty_values_are_not_registered() -> None:
    register_secret(None, "", "Y", "crm")

    assert redact("status Y scope crm") == "status Y scope crm"


def test_text_without_secrets_is_unchanged() -> None:
    line = f"Job 7 done: contact_id=46 {CONTEXT} REST https://{DOMAIN}/rest/crm.contact.add -> 200"

    assert redact(line) == line


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """configure_logging() on a private stream; the root logger is put back afterwards."""
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    names = ("uvicorn", "uvicorn.error", "uvicorn.access", "httpx", "httpcore", "aiosqlite", "filelock")
    loggers = [logging.getLogger(name) for name in names]
    saved = [(logger, list(logger.handlers), logger.propagate, logger.level) for logger in loggers]
    stream = io.StringIO()
    configure_logging("debug", stream=stream)
    yield stream
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)
    for logger, handlers, propagate, level in saved:
        logger.handlers[:] = handlers
        logger.propagate = propagate
        logger.setLevel(level)


def test_log_lines_never_carry_a_registered_secret(log_stream: io.StringIO) -> None:
    value = secrets.token_urlsafe(24)
    register_secret(value)

    logging.getLogger("services.processing").info("Stored token %s for portal %s", value, DOMAIN)

    output = log_stream.getvalue()
    assert value not in output
    assert f"Stored token {MASK} for portal {DOMAIN}" in output


def test_tracebacks_never_carry_a_registered_secret(log_stream: io.StringIO) -> None:
    value = secrets.token_hex(20)
    register_secret(value)

    try:
        raise RuntimeError(f"refresh failed with refresh token {value}")
    except RuntimeError:
        logging.getLogger("services.bitrix_client").exception("Refresh failed for %s", MEMBER_ID)

    output = log_stream.getvalue()
    assert "Traceback (most recent call last)" in output
    assert "RuntimeError: refresh failed with refresh token" in output
    assert value not in output
    assert MEMBER_ID in output


def test_uvicorn_access_log_goes_through_the_redacting_handler(log_stream: io.StringIO) -> None:
    access = logging.getLogger("uvicorn.access")
    # What uvicorn's own log config leaves behind when its access log is on.
    access.handlers[:] = [logging.StreamHandler(io.StringIO())]
    access.propagate = False
    access.setLevel(logging.INFO)
    configure_logging("debug", stream=log_stream)

    access.info(
        '127.0.0.1 - "GET /oauth/callback?code=%s&state=%s HTTP/1.1" 302', "avmocpghblyi01m3", "JJHgsdgfk"
    )

    output = log_stream.getvalue()
    assert "/oauth/callback?code=" in output
    assert "avmocpghblyi01m3" not in output
    assert "JJHgsdgfk" not in output


def test_uvicorn_access_log_switched_off_stays_off(log_stream: io.StringIO) -> None:
    access = logging.getLogger("uvicorn.access")
    access.handlers.clear()  # what `--no-access-log` leaves behind
    access.propagate = False
    configure_logging("debug", stream=log_stream)

    access.info('127.0.0.1 - "GET /health HTTP/1.1" 200')

    assert "GET /health" not in log_stream.getvalue()


def test_httpx_info_lines_are_silenced(log_stream: io.StringIO) -> None:
    logging.getLogger("httpx").info("HTTP Request: POST https://oauth.test/oauth/token/")

    assert "HTTP Request" not in log_stream.getvalue()


def test_configure_logging_twice_keeps_one_handler(log_stream: io.StringIO) -> None:
    second = io.StringIO()
    configure_logging("INFO", stream=second)

    logging.getLogger("router").warning("once")

    assert second.getvalue().count("once") == 1
    assert "once" not in log_stream.getvalue()


def test_the_time_stamp_is_the_standard_one_and_follows_the_clock() -> None:
    # The formatter works the date out once a second; each line must still show its own time.
    from services.observability import _FORMAT, RedactingFormatter

    ours, standard = RedactingFormatter(_FORMAT), logging.Formatter(_FORMAT)
    for created in (1795877220.004, 1795877220.999, 1795877221.5, 1795877220.25, 1795880000.0):
        record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
        record.created, record.msecs = created, (created - int(created)) * 1000
        assert ours.formatTime(record) == standard.formatTime(record)


@pytest.mark.parametrize(
    ("message", "args"),
    [
        ("Robot call accepted as job %d", (42,)),
        ("Refused %s: %s", ("POST /robot", "bad\nline\x1b[31m")),
        ("token access_token=%s here", ("s6p6eclrvim6da22ft9ch94ekreb52lv",)),
        ("plain", None),
    ],
)
def test_the_usual_line_is_the_standard_formatters_line(message: str, args: Any) -> None:
    # The formatter builds the usual line directly; it must equal what the standard path writes.
    from services.observability import _FORMAT, RedactingFormatter, portal_var, request_id_var

    formatter = RedactingFormatter(_FORMAT)
    request_id_var.set("dd8c2ad85111")
    portal_var.set("example.bitrix24.ru")
    for level in (logging.INFO, logging.WARNING, logging.CRITICAL):
        fast = logging.LogRecord("services.processing", level, __file__, 1, message, args, None)
        slow = logging.LogRecord("services.processing", level, __file__, 1, message, args, None)
        slow.created, slow.msecs = fast.created, fast.msecs
        line = formatter.format(fast)
        slow.context = getattr(fast, "context")  # noqa: B009  # set by format() before either path
        assert line == formatter._standard_format(slow)
