"""Console logging: one root handler, a context prefix per line, and no secret on any line.

Secrets are masked twice over: by shape (`access_token=…`, `auth[refresh_token]=…`, JSON
`"client_secret": "…"`, event tokens) and by value (every token the app has stored or handled is
registered here and replaced wherever it shows up, in messages, URLs and tracebacks alike).
"""

import logging
import re
import sys
import time
from collections import OrderedDict
from contextvars import ContextVar
from typing import TextIO

request_id_var: ContextVar[str] = ContextVar("request_id", default="-")
portal_var: ContextVar[str] = ContextVar("portal", default="-")
workflow_var: ContextVar[str] = ContextVar("workflow", default="-")

MASK = "***"
_KEYS = (
    r"access_token|refresh_token|client_secret|application_token|event_token|auth_id|refresh_id"
    r"|code|auth|password|state"
)
_OPEN, _CLOSE = r"(?:\[|%5B)", r"(?:\]|%5D)"
_BY_KEY = re.compile(
    rf"(?i)((?<![A-Za-z0-9_])(?:{_KEYS})(?:{_CLOSE})?[\"']?\s*(?:=>|=|:)\s*[\"']?)([^&\s\"',}}\]]+)"
)
_BRACKETED = re.compile(rf"(?i)({_OPEN}(?:{_KEYS}){_CLOSE}=)([^&\s]+)")
_EVENT_TOKEN = re.compile(r"[\w.]+(?:\||%7C)A[\w]+(?:\||%7C)[\w]+\.[0-9a-f]{16,}")
# C0 and C1 control characters, DEL, and the Unicode line and paragraph separators: any of them
# in a value from a request could start a forged line or rewrite the terminal. Shown escaped.
_CONTROLS = {
    code: f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
    for code in (*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029)
}
_SECRETS: OrderedDict[str, None] = OrderedDict()
_MAX_SECRETS = 256
_MIN_SECRET = 8
# All registered secrets as one alternation (longest first), built when first needed after a
# change: one search in C per line instead of a loop over up to 256 values.
_known: re.Pattern[str] | None = None
# Every secret shape above needs one of these characters; a line without them skips the regexes.
_SHAPE_CHARS = re.compile(r"[=:|%]")


def register_secret(*values: str | None) -> None:
    """Remember values that must be masked wherever they appear later."""
    global _known
    for value in values:
        if not value or len(value) < _MIN_SECRET:
            continue
        if value not in _SECRETS:
            _known = None
        _SECRETS[value] = None
        _SECRETS.move_to_end(value)
        # Bounded: old rotated tokens are dead anyway, and each line is checked against them all.
        while len(_SECRETS) > _MAX_SECRETS:
            _SECRETS.popitem(last=False)


def _mask_known(text: str) -> str:
    global _known
    if not _SECRETS:
        return text
    if _known is None:
        _known = re.compile("|".join(re.escape(s) for s in sorted(_SECRETS, key=len, reverse=True)))
    return _known.sub(MASK, text)


def redact(text: str) -> str:
    """The text with every known secret and every secret-shaped `key=value` masked."""
    text = _mask_known(text)
    if _SHAPE_CHARS.search(text) is None:
        return text
    text = _EVENT_TOKEN.sub(MASK, text)
    text = _BRACKETED.sub(rf"\1{MASK}", text)
    return _BY_KEY.sub(lambda m: m.group(1) + (m.group(2) if m.group(2) == MASK else MASK), text)


def escape_controls(text: str) -> str:
    """The text with control characters written as `\\xNN`, so it stays on one line."""
    return text if text.isprintable() else text.translate(_CONTROLS)


class RedactingFormatter(logging.Formatter):
    """Formats as usual, with secrets masked in the message and the traceback.

    The time, level and logger name cannot hold a secret, so only the parts after them are
    searched; the context (request id, portal host, workflow id: none of them a secret) only
    for known secret values. The context and the message are escaped, as their values may come
    from a request; a traceback keeps its own line breaks.
    """

    def __init__(self, fmt: str) -> None:
        super().__init__(fmt)
        self._stamp = (-1, "")  # (second, its text): one tuple, so threads never see half of it

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """The default `2026-11-28 14:30:56,123`, with the date and time worked out once a second."""
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second, text = self._stamp
        if second != int(record.created):
            second = int(record.created)
            text = time.strftime(self.default_time_format, self.converter(record.created))
            self._stamp = (second, text)
        return f"{text},{int(record.msecs):03d}"

    def format(self, record: logging.LogRecord) -> str:
        record.context = context = _context()
        if self._fmt == _FORMAT and not (record.exc_info or record.exc_text or record.stack_info):
            # The usual line, built in one step: Formatter.format's generic steps (usesTime, the
            # style's `%` over the record's whole __dict__) cost more than the line itself, and
            # every robot call writes one (`_standard_format` gives the same; a test compares).
            record.message = redact(escape_controls(record.getMessage()))
            record.asctime = self.formatTime(record)
            return f"{record.asctime} {record.levelname:<7} {record.name} [{context}] {record.message}"
        return self._standard_format(record)

    def _standard_format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        # A traceback may have been rendered (and cached on the record) by another handler.
        return redact(line) if record.exc_text or record.stack_info else line

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = redact(escape_controls(record.message))
        return super().formatMessage(record)


def _context() -> str:
    request, portal, workflow = request_id_var.get(), portal_var.get(), workflow_var.get()
    parts = "req=" + request if request != "-" else ""
    if portal != "-":
        parts += " portal=" + portal if parts else "portal=" + portal
    if workflow != "-":
        parts += " wf=" + workflow if parts else "wf=" + workflow
    return _mask_known(escape_controls(parts))


_FORMAT = "%(asctime)s %(levelname)-7s %(name)s [%(context)s] %(message)s"
_OURS = "_bitrix_robot_handler"


def _skip_unused_record_fields() -> None:
    """Our format shows no source line, thread or process: do not look them up for every record.

    The logging HOWTO's "Optimization" section names these switches; finding the caller's frame
    alone was a fifth of the cost of a robot call's log line (bench/profile_ack.py).
    """
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


def configure_logging(level: str, stream: TextIO | None = None) -> None:
    """Send every logger, uvicorn's included, through one redacting console handler."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, _OURS, False)]:
        root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(RedactingFormatter(_FORMAT))
    setattr(handler, _OURS, True)
    root.addHandler(handler)
    root.setLevel(level.upper())
    _skip_unused_record_fields()
    # uvicorn's access log prints query strings (OAuth `code`, `state`): route it through our handler.
    # A logger uvicorn left without handlers (`--no-access-log`) stays off.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        uvicorn_logger = logging.getLogger(name)
        if uvicorn_logger.handlers:
            uvicorn_logger.handlers.clear()
            uvicorn_logger.propagate = True
    # httpx logs full URLs at INFO; ours carry no secrets, but a library's might.
    for name in ("httpx", "httpcore", "aiosqlite", "filelock"):
        logging.getLogger(name).setLevel(logging.WARNING)
