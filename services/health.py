"""What `/health` concludes: "ok", "degraded" (200) or "down" (503), each with its reasons.

"down": the app cannot accept robot calls (the journal refuses writes, the token file is
unreadable). "degraded": it accepts them but cannot finish them (settings missing, no portal
installed, no usable tokens, jobs failing). "ok": neither (interface.md, "/health for monitors").
Address warnings (plain http, a private host) are the status page's business, not these.
"""

from dataclasses import dataclass, field
from typing import Literal

from repositories.job_journal import RETRYING_AFTER
from schemas import HealthReason, PortalTokens, QueueStats
from services import messages
from services.messages import Lang

Status = Literal["ok", "degraded", "down"]


def portal_usable(record: PortalTokens) -> bool:
    """Whether the stored tokens can still reach the portal: a refresh token not known to be dead
    (refused for good, past its 180 days: `PortalTokens.works`)."""
    return bool(record.refresh_token) and record.works


@dataclass
class Observations:
    """What the service saw; `verdict` turns it into a status and reasons."""

    journal_error: str | None = None
    token_store_error: str | None = None  # unreadable: robot calls cannot be authenticated
    tokens_unsaved: list[tuple[str, str]] = field(default_factory=list)  # (domain, why): pairs only in memory
    missing_settings: list[str] = field(default_factory=list)
    portals: int = 0
    usable_portals: int = 0
    queue: QueueStats = field(default_factory=QueueStats)


def verdict(seen: Observations) -> tuple[Status, list[HealthReason]]:
    down = []
    if seen.journal_error:
        down.append(HealthReason(key="journal_down", values={"detail": seen.journal_error}))
    if seen.token_store_error:
        down.append(HealthReason(key="token_store_down", values={"detail": seen.token_store_error}))
    if down:
        return "down", down
    degraded = _unfinishable(seen)
    return ("degraded", degraded) if degraded else ("ok", [])


def reason_text(reason: HealthReason, lang: Lang = "en") -> str:
    """The reason in words: English for /health (the monitors' contract), else the page's language."""
    return messages.text(lang, f"health_{reason.key}", **reason.values)


def _unfinishable(seen: Observations) -> list[HealthReason]:
    reasons = [
        HealthReason(key="tokens_unsaved", values={"domain": domain, "error": error})
        for domain, error in seen.tokens_unsaved
    ]
    if seen.missing_settings:
        reasons.append(
            HealthReason(key="missing_settings", values={"names": ", ".join(seen.missing_settings)})
        )
    if not seen.portals:
        reasons.append(HealthReason(key="no_portal"))
    elif not seen.usable_portals:
        reasons.append(HealthReason(key="no_usable_tokens"))
    queue = seen.queue
    if queue.failed_last_day:
        reasons.append(HealthReason(key="failed_last_day", values={"count": queue.failed_last_day}))
    if queue.retrying:
        reasons.append(
            HealthReason(key="retrying", values={"count": queue.retrying, "attempts": RETRYING_AFTER})
        )
    return reasons
