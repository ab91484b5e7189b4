"""Scenario burst: calls through the rate limit, against the bucket's floor and a naive client."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.harness import BATCH, BURST, PROJECT, Bench, BenchError, Portal, _clean_env, _require_all_ok
from bench.postgres import export_tokens

# --------------------------------------------------------------------------------------------
# Scenario 2: a burst of calls through the rate limit, against the floor and a naive client
# --------------------------------------------------------------------------------------------


def bucket_seconds(requests: int, burst: int, drain: float) -> float:
    """The least time a leaky bucket (size `burst`, `drain`/s) allows `requests` requests in."""
    return max(0, requests - burst) / drain


def _wait_answers(portal: Portal, target: int, process: subprocess.Popen[bytes], limit: float) -> float:
    """Poll the fake until it recorded `target` answers; returns when it saw them (epoch)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if portal.stats()["answers"] >= target:
            return time.time()
        if process.poll() not in (None, 0):
            raise BenchError(f"the client exited with {process.returncode} before all answers arrived")
        time.sleep(0.02)
    stats = portal.stats()
    raise BenchError(
        f"only {stats['answers']} of {target} answers within {limit}s; "
        f"recent errors {stats['recent_errors'][-3:]}"
    )


def _settle_bucket(drain: float) -> None:
    time.sleep(max(0.5, BURST / drain))  # the portal's bucket is empty again


def _check_answers(portal: Portal, tokens: Sequence[str]) -> int:
    answers = portal.answers()
    good = 0
    for token in tokens:
        values = answers.get(token, {}).get("return_values", {})
        if int(values.get("contact_id") or 0) > 0 and not values.get("error"):
            good += 1
    return good


def scenario_burst(bench: Bench) -> dict[str, Any]:
    plan, portal = bench.plan, bench.portal
    count, drain = plan.burst_calls, plan.drain
    portal.release()
    portal.rate_limit(BURST, drain)
    # The app's own bucket mirrors the portal's plan, as an operator would set it.
    app = bench.start_app("burst", RATE_LIMIT_BURST=str(BURST), RATE_LIMIT_PER_SECOND=str(drain))
    try:
        calls = portal.robot_bodies(count, bench.indices(count))
        bodies = bench.bodies_file("burst", [body for _, body in calls])
        _settle_bucket(drain)
        before = portal.stats()
        process, out = bench.start_loadgen(app, ["--bodies", str(bodies)], 0, "burst")
        done_at = _wait_answers(portal, before["answers"] + count, process, 120.0)
        result = bench.finish_loadgen(process, out, 60.0)
        _require_all_ok(result, "burst")
        after = portal.stats()
        good = _check_answers(portal, [token for token, _ in calls])
    finally:
        app.stop()
    if "burst" in bench.database_urls:  # the naive client reads the tokens from a file
        export_tokens(bench.database_urls["burst"], app.workdir / "tokens.json")
    naive = run_naive(bench, app.workdir / "tokens.json", count)
    requests = after["rest_requests"] - before["rest_requests"]
    arrival = result["elapsed"]
    bucket = bucket_seconds(2 * math.ceil(count / BATCH), BURST, drain)
    floor = max(arrival, bucket)
    wall = done_at - result["first_send"]
    return {
        "calls": count,
        "burst": BURST,
        "drain": drain,
        "arrival_s": arrival,
        "ack_rate": result["rate"],
        "bucket_floor_s": bucket,
        "floor_s": floor,
        "wall_s": wall,
        "wall_over_floor": wall / floor,
        "rest_requests": requests,
        "requests_per_call": requests / count,
        "batches": after["batches"] - before["batches"],
        "rate_limited": after["rate_limited"] - before["rate_limited"],
        "answered_with_contact": good,
        "naive": naive,
        "naive_over_app_wall": naive["wall_s"] / wall,
    }


def run_naive(bench: Bench, token_file: Path, count: int) -> dict[str, Any]:
    """The same number of calls, one REST request per command, straight at the portal."""
    portal = bench.portal
    calls = portal.robot_bodies(count, bench.indices(count))
    bodies = bench.bodies_file("naive", [body for _, body in calls])
    out = bench.workdir / "naive.json"
    _settle_bucket(bench.plan.drain)
    before = portal.stats()
    command = [sys.executable, "-m", "bench.naive", "--token-file", str(token_file)]
    command += ["--bodies", str(bodies), "--out", str(out), "--time-limit", "150"]
    process = bench.processes.start(command, cwd=PROJECT, env=_clean_env(), log=bench.workdir / "naive.log")
    try:
        process.wait(200)
    except subprocess.TimeoutExpired as exc:
        raise BenchError("the naive client did not finish in time") from exc
    finally:
        bench.processes.stop(process)
    if process.returncode != 0 or not out.exists():
        raise BenchError(f"the naive client failed ({process.returncode}); see {bench.workdir}/naive.log")
    result: dict[str, Any] = json.loads(out.read_text())
    after = portal.stats()
    requests = after["rest_requests"] - before["rest_requests"]
    return {
        "wall_s": result["wall_s"],
        "answered": result["answered"],
        "answered_with_contact": _check_answers(portal, [token for token, _ in calls]),
        "rest_requests": requests,
        "requests_per_call": requests / count,
        "rate_limited": after["rate_limited"] - before["rate_limited"],
    }
