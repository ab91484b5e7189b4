"""The REST side of find-or-create, and how its decisions become journal writes.

`contact_matching` decides; this module asks the portal what the decision needs (one search
`batch` per pass, one read `batch` when anyone was found, one fill `batch` in `update` mode) and
routes each job: answered with a found contact, created by the worker, or retried.

A pass holds up to `PASS_LIMIT` jobs, more than one `batch` of adds or answers: its search and its
read serve them all (a pass of 100 needs at most 10 `findbycomm` commands and usually one read
command), so a pass that both finds and creates costs search, read, add, answers for 100 calls
instead of twice that for two passes of 50. Commands beyond 50 go in further batches, sent
together.
"""

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from repositories.job_journal import Job
from services import messages
from services.bitrix_client import BitrixClient, BitrixError
from services.contact_matching import (
    Decision,
    Found,
    Wanted,
    decide,
    found_ids,
    read_commands,
    read_found,
    read_mode,
    search_commands,
    update_params,
)
from services.messages import Lang
from services.retry import RetryPolicy

# How long the portal may go on running a request whose reply was lost (services/worker.py
# PORTAL_REQUEST_SECONDS, which imports this module): a fill is recomputed only after that.
SETTLE_SECONDS = 60.0
BATCH_LIMIT = 50  # Bitrix24 runs at most 50 commands in one `batch` (wire doc 4.3)
PASS_LIMIT = 2 * BATCH_LIMIT  # jobs in one pass of the worker (see the module docstring)

T = TypeVar("T")


def chunks(items: Sequence[T], size: int = BATCH_LIMIT) -> list[list[T]]:
    """`items` in consecutive groups of at most `size` (one `batch` each)."""
    return [list(items[index : index + size]) for index in range(0, len(items), size)]


class Writes(Protocol):
    """The worker's journal writes for one pass (services/worker.py `_Writes`)."""

    sends: list[tuple[int, int, str]]
    lang: Lang

    def to_send(self, job: Job, contact_id: int, error: str) -> Job: ...

    def found(self, job: Job, contact_id: int, note: str) -> Job: ...

    def retry(self, job: Job, error: BitrixError, policy: RetryPolicy, at_least: float = 0.0) -> None: ...


@dataclass(frozen=True)
class Steps:
    """What find-or-create needs from the worker: the client, the writes, the policy, the adds."""

    bitrix: BitrixClient
    writes: Writes
    policy: RetryPolicy
    add: Callable[[list[Job]], Awaitable[list[Job]]]


@dataclass
class Plan:
    """Decisions by job id; `error` when the search failed (the looking jobs get no decision)."""

    decisions: dict[int, Decision] = field(default_factory=dict)
    error: BitrixError | None = None


async def find_or_add(
    steps: Steps, member_id: str, jobs: list[Job], fields: Mapping[int, Mapping[str, Any]], region: str
) -> list[Job]:
    """Decide for each job, answer the found ones, create the rest; returns the jobs ready to answer."""
    wanted = [Wanted(job.id, read_mode(job.properties), fields[job.id]) for job in jobs]
    decided = await plan(steps.bitrix, member_id, wanted, region)
    ready: list[Job] = []
    if decided.error is not None:
        undecided = [job for job in jobs if job.id not in decided.decisions]
        ready += _search_failed(steps, undecided, decided.error)
    decisions = decided.decisions
    ready += await _take_found(steps, member_id, jobs, decisions)
    creating = [job for job in jobs if job.id in decisions and decisions[job.id].action == "create"]
    if creating:
        ready += await steps.add(creating)
    return ready + _take_in_pass(steps, jobs, decisions)


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


def _search_failed(steps: Steps, jobs: list[Job], exc: BitrixError) -> list[Job]:
    """A search that may work later is retried; a refused one answers (creating could duplicate)."""
    if exc.retryable:
        for job in jobs:
            steps.writes.retry(job, exc, steps.policy)
        return []
    lang = steps.writes.lang
    reason = messages.text(lang, "search_refused", detail=exc, hint=messages.hint(lang, exc))
    return [steps.writes.to_send(job, 0, reason) for job in jobs]


async def _take_found(
    steps: Steps, member_id: str, jobs: list[Job], decisions: Mapping[int, Decision]
) -> list[Job]:
    """Jobs answered with a contact the portal already had (`update` mode fills it first)."""
    found = [job for job in jobs if job.id in decisions and decisions[job.id].action == "found"]
    found = [job for job in found if not decisions[job.id].creator]
    sent = time.time()
    failures = await _fill(steps.bitrix, member_id, [decisions[j.id] for j in found if decisions[j.id].fill])
    ready: list[Job] = []
    for job in found:
        decision, error = decisions[job.id], failures.get(job.id)
        if error is not None and error.retryable:
            # A fill that may have run is recomputed against the contact once the portal is done.
            settled = max(0.0, sent + SETTLE_SECONDS - time.time()) if error.may_have_run else 0.0
            steps.writes.retry(job, error, steps.policy, at_least=settled)
            continue
        # A refused fill leaves the contact the answer; the log says what was not filled.
        note = decision.note(decision.contact_id, steps.writes.lang, str(error or ""))
        ready.append(steps.writes.found(job, decision.contact_id, note))
    return ready


def _take_in_pass(steps: Steps, jobs: list[Job], decisions: Mapping[int, Decision]) -> list[Job]:
    """Jobs whose contact an earlier job of this pass created; `later` ones look again next pass."""
    created = {job_id: contact_id for job_id, contact_id, _ in steps.writes.sends if contact_id}
    ready: list[Job] = []
    for job in jobs:
        decision = decisions.get(job.id)
        if decision is None or not decision.creator:
            continue
        contact_id = created.get(decision.creator, 0)
        if decision.action == "found" and contact_id:
            ready.append(steps.writes.found(job, contact_id, decision.note(contact_id, steps.writes.lang)))
        else:  # its creator failed, or `update` mode: the next pass finds it in the portal
            steps.writes.retry(job, BitrixError("the same person's contact is being created"), steps.policy)
    return ready


async def _fill(
    bitrix: BitrixClient, member_id: str, decisions: Sequence[Decision]
) -> dict[int, BitrixError | None]:
    """Run the `update` mode's fills; the outcome per job (None: filled)."""
    commands = {
        f"fill{d.job_id}": ("crm.contact.update", update_params(d.contact_id, d.fill)) for d in decisions
    }
    if not commands:
        return {}
    failures: dict[int, BitrixError | None] = {}
    for group in await asyncio.gather(*(_fill_batch(bitrix, member_id, part) for part in _parts(commands))):
        failures.update(group)
    return failures


async def _fill_batch(
    bitrix: BitrixClient, member_id: str, commands: Mapping[str, tuple[str, Mapping[str, Any]]]
) -> dict[int, BitrixError | None]:
    ids = [int(key.removeprefix("fill")) for key in commands]
    try:
        # Not idempotent: a row without ID is added again each time the update runs.
        outcome = await bitrix.batch(member_id, commands, idempotent=False)
    except BitrixError as exc:
        return dict.fromkeys(ids, exc)
    return {job_id: outcome.errors.get(f"fill{job_id}") for job_id in ids}


async def _run(
    bitrix: BitrixClient, member_id: str, commands: Mapping[str, tuple[str, Mapping[str, Any]]]
) -> dict[str, Any]:
    """Batches whose commands must all succeed: a failed search must not read as "nobody"."""
    outcomes = await asyncio.gather(*(bitrix.batch(member_id, part) for part in _parts(commands)))
    results: dict[str, Any] = {}
    for outcome in outcomes:
        if outcome.errors:
            raise next(iter(outcome.errors.values()))
        results.update(outcome.results)
    return results


def _parts(
    commands: Mapping[str, tuple[str, Mapping[str, Any]]],
) -> list[dict[str, tuple[str, Mapping[str, Any]]]]:
    return [dict(part) for part in chunks(list(commands.items()))]
