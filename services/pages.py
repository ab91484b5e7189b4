"""The few HTML pages the app shows: in the portal frame, after OAuth, and on errors.

Rendered from the Jinja2 templates in `services/templates/`, with autoescaping on: run errors
quote what the workflow sent, and none of it may become markup.
"""

import re
import time
from datetime import datetime
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from schemas import RobotRun, StatusReport
from services.health import reason_text
from services.messages import Lang
from services.page_text import PAGE_TEXT, unit

_ENV = Environment(
    loader=FileSystemLoader(Path(__file__).parent / "templates"),
    autoescape=select_autoescape(["html"]),
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
# The portal's own CRM detail pages (`/crm/deal/details/4521/`; smart processes and the new invoices
# under `/crm/type/<entityTypeId>/details/<id>/`), as the portal's UI links them.
_ENTITY_PATHS = {"LEAD": "lead", "DEAL": "deal", "CONTACT": "contact", "COMPANY": "company"}
_DOCUMENT = re.compile(r"^(LEAD|DEAL|CONTACT|COMPANY|SMART_INVOICE|QUOTE|DYNAMIC_(\d+))_(\d+)$")
_TYPE_IDS = {"SMART_INVOICE": "31", "QUOTE": "7"}


def _t(lang: Lang) -> "_Translator":
    return _Translator(lang)


class _Translator:
    def __init__(self, lang: Lang) -> None:
        self.lang = lang

    def __call__(self, key: str, **params: object) -> str:
        return PAGE_TEXT[key][self.lang].format(**params)


def install_finish_page(domain: str, robot: str = "registered", lang: Lang = "en") -> str:
    """Tells the portal the install is complete; must run inside the portal's frame."""
    t = _t(lang)
    key = "installed" if robot == "registered" else "installed_robot_pending"
    return _ENV.get_template("install_finish.html").render(
        lang=lang, title=t("installed_title"), message=t(key, domain=domain)
    )


def message_page(title: str, message: str, ok: bool = True) -> str:
    return _ENV.get_template("message.html").render(lang="en", title=title, message=message, ok=ok)


def status_page(report: StatusReport, now: float | None = None) -> str:
    """The app's status: settings, handler and queue for anyone; portal and runs for its users."""
    lang: Lang = report.language
    t = _t(lang)
    return _ENV.get_template("status.html").render(
        lang=lang,
        title=t("title"),
        report=report,
        t=t,
        when=_when,
        zone=_zone_name(now),
        duration=lambda seconds: duration(lang, seconds),
        days=lambda value: unit(lang, "day", round(value)),
        document_link=lambda document_id: document_link(report.portal_url, document_id),
        outcome=outcome,
        say=lambda reason: reason_text(reason, lang),
    )


def outcome(run: RobotRun) -> str:
    """What became of a run, as the administrator thinks of it (`done` alone hides bad data)."""
    if run.state == "done":
        return "answered_error" if run.error or not run.contact_id else "created"
    if run.state in ("failed", "abandoned"):
        return run.state
    return "pending"


def document_link(portal_url: str | None, document_id: str) -> str | None:
    """The portal page of the CRM document a run's workflow belongs to, when it is a CRM one."""
    parts = document_id.split("/")
    if not portal_url or len(parts) != 3 or parts[0] != "crm":
        return None
    match = _DOCUMENT.match(parts[2])
    if not match:
        return None
    kind, dynamic_type, number = match.groups()
    if kind in _ENTITY_PATHS:
        return f"{portal_url}/crm/{_ENTITY_PATHS[kind]}/details/{number}/"
    type_id = dynamic_type or _TYPE_IDS[kind]
    return f"{portal_url}/crm/type/{type_id}/details/{number}/"


def duration(lang: Lang, seconds: float) -> str:
    """`2 h 5 min`, `59 min`, `12 s`: what a person reads, not `3586s`."""
    total = int(seconds)
    if total >= 86400:
        return unit(lang, "day", total // 86400)
    if total >= 3600:
        return f"{unit(lang, 'h', total // 3600)} {unit(lang, 'min', total % 3600 // 60)}"
    if total >= 60:
        return unit(lang, "min", total // 60)
    return unit(lang, "s", total)


def _when(timestamp: float) -> str:
    """Local time with its zone: `2026-11-28 12:41:02 UTC+03:00`."""
    moment = datetime.fromtimestamp(timestamp).astimezone()
    return f"{moment:%Y-%m-%d %H:%M:%S} {_offset(moment)}"


def _zone_name(now: float | None) -> str:
    moment = datetime.fromtimestamp(now or time.time()).astimezone()
    name = moment.tzname() or ""
    offset = _offset(moment)
    return offset if not name or name == offset or name.startswith(("+", "-")) else f"{name} ({offset})"


def _offset(moment: datetime) -> str:
    delta = moment.utcoffset()
    minutes = int(delta.total_seconds() // 60) if delta else 0
    sign = "+" if minutes >= 0 else "-"
    return f"UTC{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"
