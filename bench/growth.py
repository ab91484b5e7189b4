"""Scenario growth: time per call and peak RSS as the queue grows."""

from __future__ import annotations

import shutil
import statistics
from typing import Any

from bench.harness import Bench, _require_all_ok

# --------------------------------------------------------------------------------------------
# Scenario 3: growth of the queue
# --------------------------------------------------------------------------------------------


def _repeats(size: int) -> int:
    """A run of 100 calls is over in a blink: several per round, for a steadier median."""
    return 3 if size <= 100 else 1


def _queue_once(bench: Bench, template: str, size: int, tag: str) -> dict[str, Any]:
    """A fresh app, the portal held, `size` calls queued; its time per call and memory."""
    plan, portal = bench.plan, bench.portal
    portal.release()
    app = bench.start_app(tag)
    try:
        portal.hold()
        path, marker = bench.template_file(tag, template)
        source = ["--template", str(path), "--marker", marker, "--count", str(size)]
        start = app.memory_kb()
        cpu = app.cpu_seconds()
        result = bench.load(app, source, plan.growth_warmup, tag)
        cpu = app.cpu_seconds() - cpu
        _require_all_ok(result, tag)
        peak = app.memory_kb()
    finally:
        app.stop()
        portal.release()
    shutil.rmtree(app.workdir, ignore_errors=True)  # the journal of 10,000 jobs is not needed again
    return {
        "ms_per_call": result["elapsed"] / size * 1000,
        "cpu_ms_per_call": cpu / (size + plan.growth_warmup) * 1000,
        "rate": result["rate"],
        "latency_p50_ms": result["latency_ms"]["p50"],
        "latency_p99_ms": result["latency_ms"]["p99"],
        "rss_start_mb": start.get("VmRSS", 0) / 1024,
        "peak_rss_mb": peak.get("VmHWM", 0) / 1024,
    }


def scenario_growth(bench: Bench) -> dict[str, Any]:
    """Sizes interleaved over rounds, so the machine's drift spreads over all of them alike."""
    plan, portal = bench.plan, bench.portal
    portal.release()
    template = portal.robot_body(bench.indices(1))[1]
    runs: dict[int, list[dict[str, Any]]] = {size: [] for size in plan.growth_sizes}
    for number in range(plan.growth_rounds):
        for size in plan.growth_sizes:
            for repeat in range(_repeats(size)):
                runs[size].append(_queue_once(bench, template, size, f"growth-{size}-{number}-{repeat}"))
        shown = ", ".join(f"{size}: {runs[size][-1]['ms_per_call']:.2f}" for size in plan.growth_sizes)
        print(f"  growth round {number + 1}: ms/call {shown}", flush=True)
    sizes = [_growth_entry(size, found) for size, found in runs.items()]
    first = sizes[0]["ms_per_call"]
    for entry in sizes:
        entry["time_ratio"] = entry["ms_per_call"] / first
    return {
        "sizes": sizes,
        "rounds": plan.growth_rounds,
        "warmup": plan.growth_warmup,
        "concurrency": plan.concurrency,
    }


def _growth_entry(size: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "queued": size,
        "runs": len(runs),
        "ms_per_call": statistics.median(run["ms_per_call"] for run in runs),
        "ms_per_call_runs": [run["ms_per_call"] for run in runs],
        "cpu_ms_per_call": statistics.median(run["cpu_ms_per_call"] for run in runs),
        "rate": statistics.median(run["rate"] for run in runs),
        "latency_p50_ms": statistics.median(run["latency_p50_ms"] for run in runs),
        "rss_start_mb": max(run["rss_start_mb"] for run in runs),
        "peak_rss_mb": max(run["peak_rss_mb"] for run in runs),
    }
