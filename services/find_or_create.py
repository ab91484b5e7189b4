"""The REST side of find-or-create: one search `batch` per pass, one read `batch` when it found anyone.

`contact_matching` decides; this module only asks the portal what the decision needs. The worker
calls `plan` with the jobs it is about to create contacts for and gets a decision per job.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from services.bitrix_client import BitrixClient, BitrixError
from services.contact_matching import (
    Decision,
    Found,
    Wanted,
    decide,
    found_ids,
    read_commands,
    read_found,
    search_commands,
    update_params,
)


@dataclass
class Plan:
    """Decisions by job id; `error` when the search failed (the looking jobs are then retried)."""

    decisions: dict[int, Decision] = field(default_factory=dict)
    error: BitrixError | None = None


async def plan(bitrix: BitrixClient, member_id: str, wanted: Sequence[Wanted], region: str) -> Plan:
    """Search the portal for the jobs that look first, then decide for every job."""
    commands = search_commands(wanted)
    found: dict[int, Found] = {}
    try:
        if commands:
            results = await _run(bitrix, member_id, commands)
            ids = found_ids(results)
            if ids:
                found = read_found(await _run(bitrix, member_id, read_commands(ids)), region)
    except BitrixError as exc:
        creating = [w for w in wanted if w.mode == "create"]
        return Plan({d.job_id: d for d in decide(creating, {})}, exc)
    return Plan({d.job_id: d for d in decide(wanted, found)})


async def fill(
    bitrix: BitrixClient, member_id: str, decisions: Sequence[Decision]
) -> dict[int, BitrixError | None]:
    """Run the `update` mode's fills; the outcome per job (None: filled)."""
    commands = {
        f"fill{d.job_id}": ("crm.contact.update", update_params(d.contact_id, d.fill)) for d in decisions
    }
    if not commands:
        return {}
    try:
        outcome = await bitrix.batch(member_id, commands)
    except BitrixError as exc:
        return {d.job_id: exc for d in decisions}
    return {d.job_id: outcome.errors.get(f"fill{d.job_id}") for d in decisions}


async def _run(
    bitrix: BitrixClient, member_id: str, commands: Mapping[str, tuple[str, Mapping[str, Any]]]
) -> dict[str, Any]:
    """One batch whose commands must all succeed: a failed search must not read as "nobody"."""
    outcome = await bitrix.batch(member_id, commands)
    if outcome.errors:
        raise next(iter(outcome.errors.values()))
    return outcome.results
