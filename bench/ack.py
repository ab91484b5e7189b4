"""Scenarios ack and durable: the acknowledgement rate against a bare app and at synchronous=NORMAL."""

from __future__ import annotations

import statistics
from typing import Any

from bench.harness import Bench, _require_all_ok

# --------------------------------------------------------------------------------------------
# Scenario 1: acknowledgement rate against the bare FastAPI app
# --------------------------------------------------------------------------------------------


def scenario_ack(bench: Bench) -> dict[str, Any]:
    plan, portal = bench.plan, bench.portal
    portal.release()
    app = bench.start_app("ack")
    bare = bench.start_bare()
    try:
        portal.hold()  # the work only queues: this measures the acknowledgement alone
        template = portal.robot_body(bench.indices(1))[1]
        rounds = []
        for number in range(plan.ack_rounds):
            path, marker = bench.template_file(f"ack-{number}", template)
            source = ["--template", str(path), "--marker", marker, "--duration", str(plan.ack_seconds)]
            order = [("app", app), ("bare", bare)]
            outcome: dict[str, Any] = {}
            for name, server in order if number % 2 == 0 else reversed(order):
                cpu = server.cpu_seconds()
                result = bench.load(server, source, plan.ack_warmup, f"ack-{number}-{name}")
                _require_all_ok(result, f"ack round {number + 1}, {name}")
                # Server CPU per call (warm-up included): steadier than the rate on a busy machine.
                calls = result["requests"] + result["warmup"]
                result["cpu_ms_per_call"] = (server.cpu_seconds() - cpu) / calls * 1000
                outcome[name] = result
            rounds.append(outcome)
            print(
                f"  ack round {number + 1}: app {outcome['app']['rate']:.0f}/s "
                f"({outcome['app']['cpu_ms_per_call']:.2f} ms CPU/call), "
                f"bare {outcome['bare']['rate']:.0f}/s "
                f"({outcome['bare']['cpu_ms_per_call']:.2f} ms CPU/call)",
                flush=True,
            )
        app_memory = app.memory_kb()
    finally:
        app.stop()
        bare.stop()
        portal.release()
    app_rate = statistics.median(r["app"]["rate"] for r in rounds)
    bare_rate = statistics.median(r["bare"]["rate"] for r in rounds)
    return {
        "seconds_per_round": plan.ack_seconds,
        "rounds": len(rounds),
        "concurrency": plan.concurrency,
        "app_calls": sum(r["app"]["requests"] for r in rounds),
        "bare_calls": sum(r["bare"]["requests"] for r in rounds),
        "app_rate": app_rate,
        "bare_rate": bare_rate,
        "ratio": app_rate / bare_rate,
        "app_latency_ms": rounds[-1]["app"]["latency_ms"],
        "bare_latency_ms": rounds[-1]["bare"]["latency_ms"],
        "app_rates": [r["app"]["rate"] for r in rounds],
        "bare_rates": [r["bare"]["rate"] for r in rounds],
        "app_peak_rss_mb": app_memory.get("VmHWM", 0) / 1024,
        "client_cpu_bare": max(r["bare"]["client_cpu"] for r in rounds),
        "app_cpu_ms_per_call": statistics.median(r["app"]["cpu_ms_per_call"] for r in rounds),
        "bare_cpu_ms_per_call": statistics.median(r["bare"]["cpu_ms_per_call"] for r in rounds),
    }


def scenario_durable(bench: Bench) -> dict[str, Any]:
    """Acknowledgement rate with FULL commits against the same app at NORMAL, rounds alternated."""
    plan, portal = bench.plan, bench.portal
    portal.release()
    full = bench.start_app("durable-full")
    normal = bench.start_app("durable-normal", app_spec="bench.normal_app:app")
    try:
        portal.hold()
        template = portal.robot_body(bench.indices(1))[1]
        rounds: list[dict[str, float]] = []
        for number in range(plan.durable_rounds):
            path, marker = bench.template_file(f"durable-{number}", template)
            source = ["--template", str(path), "--marker", marker, "--duration", str(plan.ack_seconds)]
            order = [("full", full), ("normal", normal)]
            outcome: dict[str, float] = {}
            for name, server in order if number % 2 == 0 else reversed(order):
                result = bench.load(server, source, plan.ack_warmup, f"durable-{number}-{name}")
                _require_all_ok(result, f"durable round {number + 1}, {name}")
                outcome[name] = result["rate"]
            rounds.append(outcome)
            rates = f"FULL {outcome['full']:.0f}/s, NORMAL {outcome['normal']:.0f}/s"
            print(f"  durable round {number + 1}: {rates}", flush=True)
    finally:
        full.stop()
        normal.stop()
        portal.release()
    full_rate = statistics.median(r["full"] for r in rounds)
    normal_rate = statistics.median(r["normal"] for r in rounds)
    return {
        "rounds": len(rounds),
        "seconds_per_round": plan.ack_seconds,
        "concurrency": plan.concurrency,
        "full_rate": full_rate,
        "normal_rate": normal_rate,
        # Per round, both ran back to back: their ratio is steadier than the ratio of medians.
        "ratio": statistics.median(r["full"] / r["normal"] for r in rounds),
        "full_rates": [r["full"] for r in rounds],
        "normal_rates": [r["normal"] for r in rounds],
    }
