"""Where the acknowledgement time goes: POST /robot profiled in-process with pyinstrument.

The app runs in this process (`create_app()`, its settings from the environment, `LifespanManager`,
`httpx.ASGITransport`), installed on the fake portal at `--portal-url`, which is then held so the
work only queues. A few thousand robot calls are sent over `--concurrency` concurrent tasks while
pyinstrument samples the main thread. Printed: the top frames by own time, the share of time by
area (logging, pydantic, validation, thread hops, ...), and what each step of the path costs
alone. The full call tree goes to `--report-dir` (profile_ack.txt, profile_ack.html).

    pip install -r bench/requirements.txt
    python -m bench.profile_ack --portal-url http://127.0.0.1:8100   # a running fake portal
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib
import importlib.util
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

PROJECT = Path(__file__).resolve().parent.parent
if str(PROJECT) not in sys.path:
    sys.path.insert(0, str(PROJECT))

from bench.bodies import properties, template_bodies  # noqa: E402
from config import Settings, get_settings  # noqa: E402
from tests.fake_portal import FakePortalConfig  # noqa: E402

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
BASE = "http://127.0.0.1:8000"
TOP_FRAMES = 25

# Areas of the main thread's time. A sample goes to the innermost frame of a specific area; the
# generic areas (framework, event loop, bench client) only count what no specific area claims.
SPECIFIC: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("logging (format, redact, write)", ("/logging/", "services/observability.py")),
    ("pydantic (validate, serialize)", ("/pydantic/", "/pydantic_core/")),
    (
        "contact validation (phonenumbers, email_validator)",
        ("services/contact_validation.py", "/phonenumbers/", "/email_validator/", "/idna/"),
    ),
    ("thread hops (asyncio.to_thread, anyio run_in_threadpool)", ("asyncio/threads.py", "/anyio/")),
    ("job journal (sqlite, json)", ("repositories/job_journal.py",)),
    ("token store", ("repositories/token_store.py",)),
    ("form parsing (parse_php_form, body)", ("schemas.py", "dependencies.py")),
    ("service logic (processing, trust)", ("services/processing.py", "services/trust.py", "/router.py")),
)
GENERIC: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("request-id middleware (own code)", ("/main.py",)),
    ("FastAPI/Starlette (routing, DI, responses)", ("/fastapi/", "/starlette/")),
    ("bench client (httpx ASGITransport)", ("/httpx/", "/httpcore/", "bench/profile_ack.py")),
    ("event loop (scheduling, select)", ("/asyncio/", "selectors.py", "/uvloop/", "concurrent/futures")),
)


def _area(path: str, table: tuple[tuple[str, tuple[str, ...]], ...]) -> str | None:
    for name, needles in table:
        if any(needle in path for needle in needles):
            return name
    return None


def categorize(root: Any) -> list[tuple[str, float]]:
    """Own time of every frame, summed per area (shares of the total, largest first)."""
    totals: Counter[str] = Counter()
    stack: list[tuple[Any, str | None, bool]] = [(root, None, False)]
    for _ in range(2_000_000):  # bounded walk over the call tree
        if not stack:
            break
        frame, current, specific = stack.pop()
        path = (frame.file_path or "").replace("\\", "/")
        area = _area(path, SPECIFIC)
        if area is not None:
            current, specific = area, True
        elif not specific:
            current = _area(path, GENERIC) or current
        totals[current or "other"] += frame.total_self_time
        stack.extend((child, current, specific) for child in frame.children)
    everything = sum(totals.values()) or 1.0
    return [(name, seconds / everything) for name, seconds in totals.most_common()]


# --------------------------------------------------------------------------------------------
# Driving the app in-process
# --------------------------------------------------------------------------------------------


async def send_all(client: httpx.AsyncClient, bodies: list[str], concurrency: int) -> Counter[int]:
    statuses: Counter[int] = Counter()
    queue: Iterator[str] = iter(bodies)

    async def worker() -> None:
        for body in queue:  # shared iterator: each body is sent once
            reply = await client.post("/robot", content=body, headers=FORM)
            statuses[reply.status_code] += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return statuses


def use_settings(portal_url: str) -> Settings:
    """The app's settings, from the environment exactly as the uvicorn process gets them.

    Not `app.dependency_overrides`: with any override present, FastAPI rebuilds the dependency
    graph of every request (`get_dependant`, `inspect.signature`), about a millisecond per call
    that the real app never pays, and the profile would be about that.
    """
    defaults = FakePortalConfig()
    names = {name.upper() for name in Settings.model_fields}
    for key in [k for k in os.environ if k.startswith(("BITRIX_", "APP_")) or k in names]:
        del os.environ[key]
    os.environ.update(
        BITRIX_CLIENT_ID=defaults.client_id,
        BITRIX_CLIENT_SECRET=defaults.client_secret,
        BITRIX_PORTAL_URL=portal_url,
        BITRIX_OAUTH_URL=portal_url,
        APP_BASE_URL=BASE,
        LOG_LEVEL="INFO",
    )
    get_settings.cache_clear()
    return get_settings()


async def _timed(label: str, count: int, step: Callable[[int], Awaitable[Any]]) -> tuple[str, float]:
    started = time.perf_counter()
    for index in range(count):
        await step(index)
    return label, (time.perf_counter() - started) / count * 1e6


def _sync(step: Callable[[int], Any]) -> Callable[[int], Awaitable[Any]]:
    async def run(index: int) -> Any:
        return step(index)

    return run


async def components(settings: Settings, bodies: list[str], workdir: Path) -> list[tuple[str, float]]:
    """Microseconds per call of each step of the acknowledgement, each measured alone.

    Only the app's public functions are used, so the list survives refactoring; a step whose
    function changed shape is reported as failed instead of stopping the profile.
    """
    from starlette.concurrency import run_in_threadpool

    from repositories.job_journal import NewJob, SqliteJobJournal
    from repositories.sqlite_db import SqliteDatabase
    from repositories.token_store import JsonTokenStore
    from schemas import RobotAck, RobotCall, parse_php_form
    from services.contact_validation import contact_fields
    from services.trust import verify_callback

    count = len(bodies)
    forms = [parse_php_form(body.encode()) for body in bodies]
    calls = [RobotCall.model_validate(form) for form in forms]
    store = JsonTokenStore(settings.token_file)
    record = await store.get(calls[0].auth.member_id)
    assert record is not None
    database = SqliteDatabase(workdir / "components.sqlite3")
    journal = SqliteJobJournal(database)
    logger = logging.getLogger("bench.components")
    names = {field.name for field in dataclasses.fields(NewJob)}

    def job(index: int) -> Any:
        call = calls[index]
        values: dict[str, Any] = {
            "event_token": call.event_token,
            "member_id": record.member_id,
            "workflow_id": call.workflow_id,
            "document_id": "/".join(call.document_id),
            "deadline": time.time() + 600,
            "properties": call.properties,
            "contact": {"NAME": "x"},
            "client_endpoint": record.client_endpoint,
            "call_access_token": call.auth.access_token or "",
        }
        return NewJob(**{key: value for key, value in values.items() if key in names})

    steps: list[tuple[str, Callable[[int], Awaitable[Any]]]] = [
        ("parse_php_form(body)", _sync(lambda i: parse_php_form(bodies[i].encode()))),
        ("RobotCall.model_validate(form)", _sync(lambda i: RobotCall.model_validate(forms[i]))),
        ("verify_callback", _sync(lambda i: verify_callback(settings, record, calls[i].auth))),
        ("tokens.get(member_id)", lambda i: store.get(record.member_id)),
        ("journal.add(job): the durable record", lambda i: journal.add(job(i))),
        (
            "one INFO log line (redacting formatter)",
            _sync(lambda i: logger.info("Robot call accepted as job %d", i)),
        ),
        (
            "RobotAck validate + JSON",
            _sync(lambda i: RobotAck(status="accepted", job_id=i).model_dump_json()),
        ),
        (
            "contact_fields: phonenumbers + email_validator",
            _sync(lambda i: contact_fields(calls[i].properties, "RU")),
        ),
        ("asyncio.to_thread(no-op): one thread hop", lambda i: asyncio.to_thread(int)),
        ("a sync dependency (run_in_threadpool)", lambda i: run_in_threadpool(get_settings)),
    ]
    results = []
    try:
        for label, step in steps:
            try:
                results.append(await _timed(label, count, step))
            except Exception as exc:  # the app changed under the benchmark: say so, go on
                results.append((f"{label}: failed ({type(exc).__name__}: {exc})"[:100], math.nan))
    finally:
        await journal.close()
        database.close()
    return results


async def full_requests(app: Any, bodies: list[str]) -> list[tuple[str, float]]:
    """Whole requests one at a time through ASGITransport: the app, and the bare app."""
    bare = importlib.import_module("bench.bare_app").app
    transport = httpx.ASGITransport(app=bare)
    async with httpx.AsyncClient(transport=transport, base_url=BASE) as bare_client:
        bare_time = await _timed(
            "whole request, bare app (ASGI, one at a time)",
            len(bodies),
            lambda i: bare_client.post("/robot", content=bodies[i], headers=FORM),
        )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as client:
        app_time = await _timed(
            "whole request, app (ASGI, one at a time)",
            len(bodies),
            lambda i: client.post("/robot", content=bodies[i], headers=FORM),
        )
    return [app_time, bare_time]


async def profile(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from asgi_lifespan import LifespanManager

    from main import create_app

    pyinstrument = importlib.import_module("pyinstrument")
    settings = use_settings(args.portal_url)
    app = create_app()
    async with (
        httpx.AsyncClient(base_url=args.portal_url, timeout=30.0) as portal,
        LifespanManager(app) as manager,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=manager.app), base_url=BASE) as client,
    ):
        install = (await portal.post("/_fake/install-body", json={})).json()["body"]
        reply = await client.post("/install", content=install, headers=FORM)
        if reply.status_code != 200:
            raise SystemExit(f"install failed: {reply.status_code} {reply.text[:300]}")
        await portal.post("/_fake/hold", json={})  # the work only queues
        try:
            template = (await portal.post("/_fake/robot-body", json={"properties": properties(0)})).json()
            sizes = [args.warmup, args.calls, args.calls, args.component_calls, args.component_calls]
            bodies = template_bodies(template["body"], sum(sizes), 1)
            warm, plain, profiled, parts, whole = _split(bodies, sizes)
            await send_all(client, warm, args.concurrency)
            started = time.perf_counter()
            statuses = await send_all(client, plain, args.concurrency)
            plain_rate = len(plain) / (time.perf_counter() - started)
            profiler = pyinstrument.Profiler(interval=0.0005, async_mode="disabled")
            profiler.start()
            started = time.perf_counter()
            statuses += await send_all(client, profiled, args.concurrency)
            profiled_rate = len(profiled) / (time.perf_counter() - started)
            profiler.stop()
            costs = await components(settings, parts, workdir)
            costs += await full_requests(manager.app, whole)
        finally:
            await portal.post("/_fake/release", json={})
    if statuses.get(200, 0) != len(plain) + len(profiled):
        raise SystemExit(f"not every call was acknowledged: {dict(statuses)}")
    return _report(args, profiler, {"plain": plain_rate, "profiled": profiled_rate}, costs)


def _split(items: list[str], sizes: list[int]) -> list[list[str]]:
    parts, start = [], 0
    for size in sizes:
        parts.append(items[start : start + size])
        start += size
    return parts


CLIENT_AREA = GENERIC[2][0]


def _report(
    args: argparse.Namespace, profiler: Any, rates: dict[str, float], costs: list[tuple[str, float]]
) -> dict[str, Any]:
    flat = profiler.output_text(unicode=True, color=False, flat=True, time="percent_of_total")
    tree = profiler.output_text(unicode=True, color=False, show_all=False)
    if os.environ.get("BENCH_SHOW_ALL"):
        (Path(args.report_dir) / "profile_all.txt").write_text(
            profiler.output_text(show_all=True, processor_options={"filter_threshold": 0.003})
        )
    report_dir = Path(args.report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "profile_ack.txt").write_text(tree)
    (report_dir / "profile_ack.html").write_text(profiler.output_html())
    everything = categorize(profiler.last_session.root_frame())
    client = dict(everything).get(CLIENT_AREA, 0.0)
    # The in-process client is the bench's, not the app's: shares are of the rest.
    categories = [(name, share / (1 - client)) for name, share in everything if name != CLIENT_AREA]
    flat_lines = flat.splitlines()
    body = flat_lines[
        next((i for i, line in enumerate(flat_lines) if line.startswith("Profile at")), 0) + 1 :
    ]
    top = [line for line in body if line.strip()][:TOP_FRAMES]
    app_tree = _app_tree(tree)
    lines = [
        f"{args.calls} robot calls in-process (ASGI), {args.concurrency} concurrent: "
        f"{rates['plain']:.0f} calls/s, {rates['profiled']:.0f} calls/s under the profiler",
        "",
        f"Share of the app's main-thread time by area (the bench's own client, {client * 100:.0f} % "
        "of all samples, left out):",
        *[f"  {share * 100:5.1f} %  {name}" for name, share in categories],
        "",
        "Top frames by own time, % of all samples (pyinstrument --flat):",
        *[f"  {line.strip()}" for line in top],
        "",
        "Call tree below the app's middleware, seconds (pyinstrument):",
        *app_tree,
        "",
        "Each step alone, µs per call (one call at a time, no concurrency):",
        *[f"  {micros:8.1f}  {label}" for label, micros in costs],
        "",
        f"Full profile: {report_dir / 'profile_ack.txt'} and profile_ack.html",
    ]
    return {
        "calls": args.calls,
        "rate": rates["plain"],
        "rate_profiled": rates["profiled"],
        "categories": categories,
        "client_share": client,
        "top_frames": top,
        "components_us": costs,
        "report": "\n".join(lines),
    }


def _app_tree(tree: str) -> list[str]:
    """The subtree of pyinstrument's call tree under the app's request middleware."""
    lines = [line for line in tree.splitlines() if line.strip()]
    start = next((i for i, line in enumerate(lines) if "RequestContextMiddleware" in line), None)
    if start is None:
        return lines[:60]

    def column(line: str) -> int:
        return len(line) - len(line.lstrip(" │├└─"))

    base = column(lines[start])
    subtree = [lines[start]]
    for line in lines[start + 1 :]:
        if column(line) <= base:
            break
        subtree.append(line)
    return [line[base:] for line in subtree][:60]


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument(
        "--portal-url", required=True, help="a running fake portal (python -m tests.fake_portal)"
    )
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--component-calls", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--workdir", help="scratch directory for the app's state (default: a new temp dir)")
    parser.add_argument("--report-dir", default=str(PROJECT / "bench" / "results"))
    parser.add_argument("--out", help="also write the figures as JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if importlib.util.find_spec("pyinstrument") is None:
        print("pyinstrument is not installed: pip install -r bench/requirements.txt", file=sys.stderr)
        return 2
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bitrix24-profile-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)  # a `.env` of the project must not leak into these settings
    with (workdir / "app.log").open("w") as log, contextlib.redirect_stderr(log):
        result = asyncio.run(profile(args, workdir))
    print(result["report"])
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
