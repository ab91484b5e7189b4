"""Scenario `modes` of bench/run.py: the burst through the rate limit in each find-or-create mode.

Four runs of `Plan.burst_calls` calls, each against a fresh app on the same fake portal:

* create        - new people, `duplicates=create` (what every workflow did before issue 13);
* reuse, new    - new people, `duplicates=reuse`: one search batch, then the adds;
* reuse, found  - the people of the create run again: every call finds its contact;
* update, found - the same people with `duplicates=update`: found, nothing left to fill;
* reuse, mixed  - every other call is a person of the create run, the others are new.

Per run: REST requests per call and wall time against the floor (the later of the arrival of the
last call and the least time the portal's bucket allows the pass's requests in).
"""

from __future__ import annotations

import asyncio
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from bench import bodies as robot_bodies
from bench import burst, harness

if TYPE_CHECKING:
    from bench.harness import Bench

TARGETS = {"create": 0.05, "reuse": 0.07, "wall_over_floor": 1.2}
_PASS = 2 * harness.BATCH  # calls one worker pass claims (services/find_or_create.py PASS_LIMIT)
RUNS = (("create", "new"), ("reuse", "new"), ("reuse", "found"), ("update", "found"), ("reuse", "mixed"))


def scenario_modes(bench: Bench) -> dict[str, Any]:
    """The burst once per mode; see the module docstring."""
    count = bench.plan.burst_calls
    created = 0  # the first index of the people the create run made
    results: dict[str, Any] = {}
    for mode, who in RUNS:
        if who == "mixed":
            fresh = bench.indices(count)
            people = [created + i if i % 2 else fresh + i for i in range(count)]
        else:
            offset = bench.indices(count) if who == "new" else created
            created = offset if mode == "create" else created
            people = [offset + i for i in range(count)]
        results[f"{mode}, {who}"] = _one_run(bench, mode, people, _floor_requests(mode, who, count))
    return results


def _floor_requests(mode: str, who: str, count: int) -> int:
    """The fewest REST requests the design needs for `count` calls: per pass of `_PASS` calls one
    search (not in create) and one read (when anyone is found); adds and answers 50 a batch."""
    passes = math.ceil(count / _PASS)
    created = count if mode == "create" or who == "new" else count // 2 if who == "mixed" else 0
    search = 0 if mode == "create" else passes
    read = passes if mode != "create" and who in ("found", "mixed") else 0
    return search + read + math.ceil(created / harness.BATCH) + math.ceil(count / harness.BATCH)


def _one_run(bench: Bench, mode: str, people: list[int], floor_requests: int) -> dict[str, Any]:
    portal, drain, count, tag = bench.portal, bench.plan.drain, len(people), f"modes-{mode}-{people[0]}"
    portal.release()
    portal.rate_limit(harness.BURST, drain)
    app = bench.start_app(tag, RATE_LIMIT_BURST=str(harness.BURST), RATE_LIMIT_PER_SECOND=str(drain))
    try:
        calls = asyncio.run(_bodies(portal.url, mode, people))
        bodies = bench.bodies_file(tag, [body for _, body in calls])
        burst._settle_bucket(drain)
        before = portal.stats()
        cpu = (app.cpu_seconds(), _cpu_seconds(portal.process.pid))
        process, out = bench.start_loadgen(app, ["--bodies", str(bodies)], 0, f"modes-{mode}")
        done_at = burst._wait_answers(portal, before["answers"] + count, process, 180.0)
        cpu = (app.cpu_seconds() - cpu[0], _cpu_seconds(portal.process.pid) - cpu[1])
        result = bench.finish_loadgen(process, out, 60.0)
        harness._require_all_ok(result, f"modes {mode}")
        after = portal.stats()
        found = _duplicates(portal.answers(), [token for token, _ in calls])
    finally:
        app.stop()
    requests = after["rest_requests"] - before["rest_requests"]
    floor = max(result["elapsed"], burst.bucket_seconds(floor_requests, harness.BURST, drain))
    wall = done_at - result["first_send"]
    return {
        "mode": mode,
        "calls": count,
        "rest_requests": requests,
        "requests_per_call": requests / count,
        "per_method": _delta(before["per_method"], after["per_method"]),
        "found": found,
        "contacts_created": after["contacts"] - before["contacts"],
        "floor_requests": floor_requests,
        "floor_s": floor,
        "wall_s": wall,
        "wall_over_floor": wall / floor,
        # CPU seconds during the run (/proc): the app's own, and the fake portal's (the portal's
        # work runs on the same two CPUs here; on a real portal it does not).
        "app_cpu_s": cpu[0],
        "portal_cpu_s": cpu[1],
    }


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc), as `Server.cpu_seconds`."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _bodies(url: str, mode: str, people: list[int]) -> list[tuple[str, str]]:
    gate = asyncio.Semaphore(8)
    async with httpx.AsyncClient(base_url=url, timeout=30.0) as client:

        async def one(index: int) -> tuple[str, str]:
            properties = {**robot_bodies.properties(index), "duplicates": mode}
            async with gate:
                reply = await client.post("/_fake/robot-body", json={"properties": properties})
            reply.raise_for_status()
            data = reply.json()
            return str(data["event_token"]), str(data["body"])

        return list(await asyncio.gather(*(one(index) for index in people)))


def _duplicates(answers: dict[str, Any], tokens: list[str]) -> int:
    return sum(1 for t in tokens if answers.get(t, {}).get("return_values", {}).get("duplicate") == "Y")


def _delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


def rows(data: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """Report rows for bench/run.py's table."""
    table: list[tuple[str, str, str, str, str]] = []
    for label, run in data.items():
        target = TARGETS["create"] if run["mode"] == "create" else TARGETS["reuse"]
        per_call = run["requests_per_call"]
        table.append(
            (
                "5 modes",
                f"{label}: **REST requests per call** "
                f"({run['found']} found, {run['contacts_created']} created)",
                f"**{per_call:.3f}**",
                f"≤ {target}" if run["mode"] != "update" else "",
                ("met" if per_call <= target else "**missed**") if run["mode"] != "update" else "",
            )
        )
        ok = run["wall_over_floor"] <= TARGETS["wall_over_floor"]
        table.append(
            (
                "5 modes",
                f"{label}: wall / floor ({run['wall_s']:.2f} s / {run['floor_s']:.2f} s; "
                f"CPU s app {run.get('app_cpu_s', 0):.2f}, portal {run.get('portal_cpu_s', 0):.2f})",
                f"{run['wall_over_floor']:.2f}",
                f"≤ {TARGETS['wall_over_floor']}",
                "met" if ok else "**missed**",
            )
        )
    return table
