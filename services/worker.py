"""The job worker: turns journaled robot calls into contacts and answers, in batches.

Many waiting jobs of one portal (up to 100 a pass) become `batch`es of up to 50
`crm.contact.add`, then `batch`es of up to 50 `bizproc.event.send`; a pass's search for existing
contacts serves all its jobs (services/find_or_create.py). Each contact carries an origin id
derived from its `event_token`, so a job resumed after a crash finds the contact it already made
instead of creating a second one.
"""

import asyncio
import hashlib
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from config import Settings
from repositories.job_journal import Job, JobJournal, JobState
from services import find_or_create, messages, metrics
from services.bitrix_client import BitrixAccessDenied, BitrixClient, BitrixError, action_hint
from services.contact_matching import request_fields
from services.contact_validation import InvalidContactData
from services.leadership import FileLeadership, Leadership
from services.messages import Lang
from services.observability import portal_var, workflow_var
from services.retry import RetryPolicy

logger = logging.getLogger(__name__)

BATCH_LIMIT = find_or_create.BATCH_LIMIT  # Bitrix24 runs at most 50 commands in one `batch`
PASS_LIMIT = find_or_create.PASS_LIMIT  # jobs one pass claims: one search serves them all
ORIGINATOR_ID = "bitrix24-robot-app"
_ADD_SHARE = 0.75  # of a job's budget spent creating the contact; the rest is for the answer
# Calls accepted by another worker process cannot wake this one: poll the journal this often.
_IDLE_SECONDS = 0.5
_MAX_PASSES = 4  # batches in flight at once; the rate limiter still paces their requests
# A job's own retries: capped at 5 minutes, for as long as its workflow waits (interface.md).
JOB_RETRY = RetryPolicy(base_delay=1.0, max_delay=300.0)
# How long the portal may go on running a request after the app stopped waiting for it (issue #8
# measured up to 60 s). After such a loss, contacts are looked up only once it must be over.
PORTAL_REQUEST_SECONDS = find_or_create.SETTLE_SECONDS


def origin_id(event_token: str) -> str:
    """A stable id for the contact of one robot call (the token itself is a secret)."""
    return hashlib.sha256(event_token.encode()).hexdigest()[:32]


class JobWorker:
    """Processes due jobs until cancelled; `wake()` when a new job is journaled."""

    def __init__(
        self,
        journal: JobJournal,
        bitrix: BitrixClient,
        settings: Settings,
        policy: RetryPolicy,
        leadership: Leadership | None = None,
        language_of: Callable[[str], Awaitable[Lang]] | None = None,
    ) -> None:
        self._journal = journal
        self._language_of = language_of or _english
        self._bitrix = bitrix
        self._settings = settings
        self._policy = policy
        self._leadership: Leadership = leadership or FileLeadership(
            Path(f"{settings.job_db_file}.worker.lock")
        )
        self._wakeup = asyncio.Event()
        self._last_due = -1  # jobs due at the previous look, to tell a growing batch from a stalled one
        self._in_flight: set[int] = set()  # ids of the jobs the running passes work on
        self._leader_jobs: list[Callable[[], Coroutine[Any, Any, None]]] = []

    def wake(self) -> None:
        self._wakeup.set()

    def while_leading(self, job: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Also run `job` alongside the worker, in the one process that leads it."""
        self._leader_jobs.append(job)

    async def run(self) -> None:
        """Loop until cancelled, while this process leads; failures are logged and retried, never fatal."""
        while True:
            async with self._leadership.hold() as lost:
                await self._lead(lost)
            logger.warning("Job worker stopped: leadership lost; waiting to lead again")

    async def _lead(self, lost: asyncio.Event) -> None:
        try:
            # The previous leader is gone: its leases would only delay its jobs until they expire.
            reclaimed = await self._journal.reclaim_leases()
        except Exception:
            logger.exception("Job worker could not reclaim the previous leader's leases")
            reclaimed = 0
        logger.info("Job worker started (%d jobs of a previous leader resumed)", reclaimed)
        loop = asyncio.create_task(self._loop(), name="job-worker-loop")
        watch = asyncio.create_task(lost.wait())
        # The leader's other duties (robot registration) run and stop with its leadership.
        extras = [asyncio.create_task(job()) for job in self._leader_jobs]
        try:
            await asyncio.wait({loop, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (loop, watch, *extras):
                task.cancel()
            await asyncio.gather(loop, watch, *extras, return_exceptions=True)

    async def _loop(self) -> None:
        running: set[asyncio.Task[None]] = set()
        try:
            while True:
                try:
                    if len(running) >= _MAX_PASSES:
                        await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                    elif not await self._start_pass(running):
                        await self._idle(running)
                except Exception:
                    # The journal may fail for a moment (disk full, locked); the worker must not die.
                    logger.exception("Job worker failed to read the journal; retrying shortly")
                    await asyncio.sleep(1.0)
        finally:
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    async def _start_pass(self, running: set[asyncio.Task[None]]) -> bool:
        """Claim due jobs and process them in the background; False when there was nothing to do.

        While passes are in flight, another starts only for a full batch, or for a partial one
        that stopped growing: a burst is pipelined without shrinking its batches (which would
        raise the REST requests per call), and its tail does not wait for the passes in flight.
        """
        if running and not await self._batch_worth_starting():
            return False
        claimed = await self._journal.claim(PASS_LIMIT, self._settings.job_lease_seconds)
        # A job whose lease ran out while a pass works on it (a portal slower than the lease, a
        # wall-clock jump) is claimed again, which renews its lease, but never worked on twice.
        jobs = [job for job in claimed if job.id not in self._in_flight]
        if not jobs:
            return False
        ids = {job.id for job in jobs}
        self._in_flight |= ids
        task = asyncio.create_task(self._pass(jobs))
        running.add(task)
        task.add_done_callback(running.discard)
        task.add_done_callback(lambda _: self._in_flight.difference_update(ids))
        return True

    async def _batch_worth_starting(self) -> bool:
        due = await self._journal.due_count(PASS_LIMIT)
        stalled, self._last_due = due == self._last_due, due
        return due >= PASS_LIMIT or (due > 0 and stalled)

    async def _pass(self, jobs: list[Job]) -> None:
        """Process claimed jobs, grouped by portal; a failure is logged, the leases expire."""
        by_portal: dict[str, list[Job]] = defaultdict(list)
        for job in jobs:
            by_portal[job.member_id].append(job)
        try:
            await asyncio.gather(
                *(self._process_portal(member, group) for member, group in by_portal.items())
            )
        except asyncio.CancelledError:
            # Shutting down: hand the jobs back now, so the next start need not wait for the lease.
            await self._journal.release([job.id for job in jobs])
            raise
        except Exception:
            logger.exception("Job worker pass failed; its jobs are retried when their lease ends")

    async def _idle(self, running: set[asyncio.Task[None]]) -> None:
        due = await self._journal.next_due()
        timeout = _IDLE_SECONDS if due is None else min(_IDLE_SECONDS, max(0.0, due - time.time()))
        wakeup = asyncio.create_task(self._wakeup.wait())
        try:
            await asyncio.wait({wakeup, *running}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            wakeup.cancel()
        self._wakeup.clear()
        # A short pause lets a burst of calls pile up into one batch instead of many small ones.
        await asyncio.sleep(self._settings.batch_linger_seconds)

    async def _process_portal(self, member_id: str, jobs: list[Job]) -> None:
        writes = _Writes(lang=await self._language_of(member_id))
        ready = [job for job in jobs if job.state == "send"]
        adds = [job for job in jobs if job.state == "add"]
        if adds:
            ready += await self._create_contacts(member_id, adds, writes)
            # The contact ids are on disk before any workflow hears about them.
            await writes.flush(self._journal)
        # use_subscription N: the workflow went on at once and expects no answer.
        for job in ready:
            if not job.wants_answer:
                writes.unanswered(job)
        ready = [job for job in ready if job.wants_answer]
        if ready:
            await self._answer(member_id, ready, writes)
        await writes.flush(self._journal)

    # --- contacts ------------------------------------------------------------------------------

    async def _create_contacts(self, member_id: str, jobs: list[Job], writes: "_Writes") -> list[Job]:
        """Create the contacts; returns the jobs that are now ready to answer."""
        ready, fields = self._triage(jobs, writes)
        live = [job for job in jobs if job.id in fields]
        found = await self._find_existing(member_id, [job for job in live if job.add_attempted], writes)
        ready += [writes.to_send(job, found[job.id], "") for job in live if found.get(job.id)]
        fresh = [job for job in live if job.id not in found]
        if fresh:
            ready += await self._find_or_add(member_id, fresh, fields, writes)
        return ready

    async def _find_or_add(
        self, member_id: str, jobs: list[Job], fields: dict[int, dict[str, Any]], writes: "_Writes"
    ) -> list[Job]:
        """Find-or-create (services/find_or_create.py); what is left is created here."""

        async def add(creating: list[Job]) -> list[Job]:
            return await self._add_contacts(member_id, creating, fields, writes)

        region = self._settings.phone_default_region
        steps = find_or_create.Steps(self._bitrix, writes, self._policy, add)
        return await find_or_create.find_or_add(steps, member_id, jobs, fields, region)

    def _triage(self, jobs: list[Job], writes: "_Writes") -> tuple[list[Job], dict[int, dict[str, Any]]]:
        """CRM fields for the jobs that can still make a contact; the others go straight to the answer."""
        ready: list[Job] = []
        fields: dict[int, dict[str, Any]] = {}
        for job in jobs:
            if time.time() > _add_deadline(job):
                cause = job.error or messages.text(writes.lang, "no_answer")
                ready.append(writes.to_send(job, 0, messages.text(writes.lang, "not_in_time", reason=cause)))
                continue
            try:
                fields[job.id] = request_fields(job.properties, self._settings.phone_default_region)
            except InvalidContactData as exc:
                ready.append(writes.to_send(job, 0, exc.message(writes.lang)))
        return ready, fields

    async def _find_existing(self, member_id: str, jobs: Sequence[Job], writes: "_Writes") -> dict[int, int]:
        """Contacts made by an earlier attempt whose outcome is unknown (a crash, a lost reply).

        Job id → contact id; 0 for a job whose look-up failed: it is retried, never added blindly.
        """
        found: dict[int, int] = {}
        parts = (self._find_existing_batch(member_id, part, writes) for part in find_or_create.chunks(jobs))
        for part_found in await asyncio.gather(*parts):
            found.update(part_found)
        return found

    async def _find_existing_batch(
        self, member_id: str, jobs: Sequence[Job], writes: "_Writes"
    ) -> dict[int, int]:
        try:
            outcome = await self._bitrix.batch(member_id, _lookup_commands(jobs))
        except BitrixError as exc:
            logger.warning("Looking up earlier contacts failed (%s); the jobs will be retried", exc)
            for job in jobs:
                writes.retry(job, exc, self._policy)
            return dict.fromkeys((job.id for job in jobs), 0)
        found: dict[int, int] = {}
        for job in jobs:
            error = outcome.errors.get(_key(job))
            if error is not None:
                writes.retry(job, error, self._policy)
                found[job.id] = 0
                continue
            items = outcome.results.get(_key(job))
            if isinstance(items, list) and items and isinstance(items[0], dict):
                found[job.id] = int(items[0]["ID"])
                _set_context(job)
                logger.info("Job %d: found contact %s from an earlier attempt", job.id, items[0]["ID"])
        return found

    async def _add_contacts(
        self, member_id: str, jobs: list[Job], fields: dict[int, dict[str, Any]], writes: "_Writes"
    ) -> list[Job]:
        # Recorded before sending: if we die mid-request, the resumed job looks before it adds.
        await self._journal.mark_add_attempted([job.id for job in jobs])
        parts = (self._add_batch(member_id, part, fields, writes) for part in find_or_create.chunks(jobs))
        return [job for ready in await asyncio.gather(*parts) for job in ready]

    async def _add_batch(
        self, member_id: str, jobs: list[Job], fields: dict[int, dict[str, Any]], writes: "_Writes"
    ) -> list[Job]:
        commands = {_key(job): ("crm.contact.add", _add_params(job, fields[job.id])) for job in jobs}
        try:
            # Not idempotent: after a lost reply the client does not resend; the job is retried,
            # and the retry first looks its contact up by ORIGIN_ID (`_find_existing`).
            sent = time.time()
            outcome = await self._bitrix.batch(member_id, commands, idempotent=False)
        except BitrixError as exc:
            return self._add_failed(jobs, exc, writes, sent)
        ready: list[Job] = []
        for job in jobs:
            error = outcome.errors.get(_key(job))
            if error is None:
                ready.append(writes.to_send(job, int(outcome.results[_key(job)]), ""))
            elif error.retryable:  # a command sent on its own may have lost its reply too
                writes.retry(job, error, self._policy, at_least=_settled_after(sent, error))
            else:
                ready.append(writes.to_send(job, 0, _portal_refused(error, writes.lang)))
        return ready

    def _add_failed(self, jobs: list[Job], exc: BitrixError, writes: "_Writes", sent: float) -> list[Job]:
        if exc.retryable:
            for job in jobs:
                writes.retry(job, exc, self._policy, at_least=_settled_after(sent, exc))
            return []
        message = messages.text(writes.lang, "not_created", detail=exc, hint=messages.hint(writes.lang, exc))
        return [writes.to_send(job, 0, message) for job in jobs]

    # --- answers -------------------------------------------------------------------------------

    async def _answer(self, member_id: str, jobs: list[Job], writes: "_Writes") -> None:
        await asyncio.gather(
            *(self._answer_batch(member_id, part, writes) for part in find_or_create.chunks(jobs))
        )

    async def _answer_batch(self, member_id: str, jobs: list[Job], writes: "_Writes") -> None:
        commands = {_key(job): ("bizproc.event.send", _answer_params(job, writes.lang)) for job in jobs}
        try:
            outcome = await self._bitrix.batch(member_id, commands)
        except BitrixError as exc:
            await self._answer_failed(jobs, exc, writes)
            return
        for job in jobs:
            writes.answered(job, outcome.errors.get(_key(job)), self._policy)

    async def _answer_failed(self, jobs: list[Job], exc: BitrixError, writes: "_Writes") -> None:
        if exc.retryable:
            for job in jobs:
                writes.answered(job, exc, self._policy)
            return
        # Our tokens are unusable (revoked, refresh refused): answer with the call's own token.
        logger.warning("Answering with the portal's token failed (%s); using each call's own token", exc)
        for job in jobs:
            writes.answered(job, await self._answer_with_call_token(job, writes.lang), self._policy)

    async def _answer_with_call_token(self, job: Job, lang: Lang) -> BitrixError | None:
        if not job.call_access_token:
            return BitrixError("no token to answer with")
        try:
            await self._bitrix.call_with_token(
                job.client_endpoint, job.call_access_token, "bizproc.event.send", _answer_params(job, lang)
            )
        except BitrixError as exc:
            return exc
        return None


@dataclass
class _Writes:
    """One pass's journal updates: decided per job, written in one transaction per kind."""

    lang: Lang = "en"  # the portal's: the workflow's `error` and LOG_MESSAGE are in it
    sends: list[tuple[int, int, str]] = field(default_factory=list)
    notes: list[tuple[int, str]] = field(default_factory=list)
    retries: list[tuple[int, float, str]] = field(default_factory=list)
    finished: list[tuple[int, JobState, str]] = field(default_factory=list)

    def to_send(self, job: Job, contact_id: int, error: str) -> Job:
        if job.found_note:  # decided "found" in an earlier, interrupted pass; created now
            self.notes.append((job.id, ""))
        self.sends.append((job.id, contact_id, error))
        _set_context(job)
        if error:
            logger.warning("Job %d: no contact: %s", job.id, error)
        else:
            logger.info("Job %d: contact %d", job.id, contact_id)
        return replace(job, state="send", contact_id=contact_id, error=error, found_note="")

    def found(self, job: Job, contact_id: int, note: str) -> Job:
        """An existing contact is the answer; the note goes to the journal before the id."""
        self.notes.append((job.id, note))
        _set_context(job)
        logger.info("Job %d: %s", job.id, note)
        self.sends.append((job.id, contact_id, ""))
        return replace(job, state="send", contact_id=contact_id, error="", found_note=note)

    def retry(self, job: Job, error: BitrixError, policy: RetryPolicy, at_least: float = 0.0) -> None:
        delay = policy.delay(job.attempts, error.retry_after)
        if error.resume_at is not None:  # e.g. a method blocked until the portal resets its time limit
            delay = max(0.0, error.resume_at - time.time())
        delay = max(delay, at_least)
        self.retries.append((job.id, delay, str(error)))
        _set_context(job)
        logger.warning("Job %d: %s; retry in %.1fs", job.id, error, delay)

    def unanswered(self, job: Job) -> None:
        """Finish a job whose workflow expects no answer."""
        self.finished.append((job.id, "done", ""))
        metrics.ROBOT_CALLS.labels(outcome="answered_with_error" if job.error else "created").inc()
        _set_context(job)
        logger.info("Job %d done: contact_id=%d; no answer sent (use_subscription=N)", job.id, job.contact_id)

    def answered(self, job: Job, error: BitrixError | None, policy: RetryPolicy) -> None:
        _set_context(job)
        if error is None:
            self.finished.append((job.id, "done", ""))
            metrics.ROBOT_CALLS.labels(outcome="answered_with_error" if job.error else "created").inc()
            suffix = f", error: {job.error}" if job.error else ""
            logger.info("Job %d done: contact_id=%d%s", job.id, job.contact_id, suffix)
        elif isinstance(error, BitrixAccessDenied):
            # The core refuses only a token that fails its signature check (restservice.php
            # extractEventToken); a late answer is accepted and dropped, so this is not "too late".
            self.finished.append((job.id, "failed", job.error))
            metrics.ROBOT_CALLS.labels(outcome="failed").inc()
            logger.error(
                "Job %d failed: the portal refused the event token, the answer was not delivered (%s)",
                job.id,
                error,
            )
        elif error.retryable and time.time() < job.deadline:
            self.retry(job, error, policy)
        else:
            self.finished.append((job.id, "failed", job.error))
            metrics.ROBOT_CALLS.labels(outcome="failed").inc()
            logger.error(
                "Job %d failed: the workflow could not be answered: %s. %s", job.id, error, error.admin_hint
            )

    async def flush(self, journal: JobJournal) -> None:
        sends, retries, finished, notes = self.sends, self.retries, self.finished, self.notes
        self.sends, self.retries, self.finished, self.notes = [], [], [], []
        if notes:
            await journal.note_found(notes)
        if sends:
            await journal.to_send(sends)
        if retries:
            await journal.retry_later(retries)
        if finished:
            await journal.finish(finished)


def _set_context(job: Job) -> None:
    portal_var.set(urlsplit(job.client_endpoint).netloc or job.member_id)
    workflow_var.set(job.workflow_id or "-")


def _key(job: Job) -> str:
    return f"job{job.id}"


def _settled_after(sent: float, error: BitrixError) -> float:
    """Seconds until a request sent at `sent` that may have run must be over on the portal.

    Looking its contacts up earlier could miss one the portal is still creating.
    """
    return max(0.0, sent + PORTAL_REQUEST_SECONDS - time.time()) if error.may_have_run else 0.0


def _lookup_commands(jobs: Sequence[Job]) -> dict[str, tuple[str, dict[str, Any]]]:
    return {
        _key(job): (
            "crm.contact.list",
            {
                "filter": {"ORIGINATOR_ID": ORIGINATOR_ID, "ORIGIN_ID": origin_id(job.event_token)},
                "select": ["ID"],
            },
        )
        for job in jobs
    }


def _add_deadline(job: Job) -> float:
    return job.created_at + (job.deadline - job.created_at) * _ADD_SHARE


def _add_params(job: Job, fields: dict[str, Any]) -> dict[str, Any]:
    marked = {**fields, "ORIGINATOR_ID": ORIGINATOR_ID, "ORIGIN_ID": origin_id(job.event_token)}
    return {"fields": marked, "params": {"REGISTER_SONET_EVENT": "N"}}


def _answer_params(job: Job, lang: Lang) -> dict[str, Any]:
    log = job.error or job.found_note or messages.text(lang, "created", contact_id=job.contact_id)
    duplicate = "Y" if job.found_note and not job.error else "N"
    return {
        "event_token": job.event_token,
        "return_values": {"contact_id": job.contact_id, "error": job.error, "duplicate": duplicate},
        "log_message": log,
    }


def _portal_refused(error: BitrixError, lang: Lang) -> str:
    detail = getattr(error, "description", "") or str(error)
    if action_hint(error):  # a classified error: its own hint says what to do
        return messages.text(lang, "portal_refused_hint", detail=detail, hint=messages.hint(lang, error))
    return messages.text(lang, "portal_refused", detail=detail)


async def _english(member_id: str) -> Lang:
    return "en"
