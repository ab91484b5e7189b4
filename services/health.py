"""What `/health` concludes: "ok", "degraded" (200) or "down" (503), each with its reasons.

"down": the app cannot accept robot calls (the journal refuses writes, the token file is
unreadable). "degraded": it accepts them but cannot finish them (settings missing, no portal
installed, no usable tokens, jobs failing). "ok": neither (interface.md, "/health for monitors").
Address warnings (plain http, a private host) are the status page's business, not these.
"""

from dataclasses import dataclass, field
from typing import Literal

from repositories.job_journal import RETRYING_AFTER
from schemas import PortalTokens, QueueStats

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
    tokens_unsaved: list[str] = field(default_factory=list)  # rotated pairs held only in memory
    missing_settings: list[str] = field(default_factory=list)
    portals: int = 0
    usable_portals: int = 0
    queue: QueueStats = field(default_factory=QueueStats)


def verdict(seen: Observations) -> tuple[Status, list[str]]:
    down = [reason for reason in (seen.journal_error, seen.token_store_error) if reason]
    if down:
        return "down", down
    degraded = _unfinishable(seen)
    return ("degraded", degraded) if degraded else ("ok", [])


def _unfinishable(seen: Observations) -> list[str]:
    reasons: list[str] = []
    reasons += seen.tokens_unsaved
    if seen.missing_settings:
        reasons.append(f"Settings missing: {', '.join(seen.missing_settings)}.")
    if not seen.portals:
        reasons.append("No portal is installed: install the app in Bitrix24.")
    elif not seen.usable_portals:
        reasons.append("No usable tokens: open /oauth/login to authorize the app again.")
    queue = seen.queue
    if queue.failed_last_day:
        reasons.append(
            f"{queue.failed_last_day} job(s) failed for good in the last 24 hours (log: 'Job N failed')."
        )
    if queue.retrying:
        reasons.append(
            f"{queue.retrying} job(s) failed {RETRYING_AFTER} or more attempts in a row and are retrying."
        )
    return reasons
