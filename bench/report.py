"""The benchmark's report: table rows per scenario, the Markdown and JSON results, the summary."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from bench import modes
from bench.attacks import attack_rows
from bench.harness import BATCH, RESULTS, TARGETS
from bench.postgres import two_rows

# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _met(ok: bool) -> str:
    return "met" if ok else "**missed**"


def _ack_rows(data: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    rates = ", ".join(f"{a:.0f}/{b:.0f}" for a, b in zip(data["app_rates"], data["bare_rates"], strict=True))
    return [
        (
            "1 ack",
            f"app: calls/s (median of {data['rounds']} rounds of {data['seconds_per_round']:g} s)",
            f"{data['app_rate']:.0f}",
            "",
            "",
        ),
        ("1 ack", "bare FastAPI: calls/s", f"{data['bare_rate']:.0f}", "", ""),
        (
            "1 ack",
            "**app / bare**",
            f"**{data['ratio']:.2f}**",
            f"≥ {TARGETS['ack_ratio']}",
            _met(data["ratio"] >= TARGETS["ack_ratio"]),
        ),
        ("1 ack", "rounds app/bare calls/s", rates, "", ""),
        (
            "1 ack",
            "server CPU per call, app vs bare (ms; bare / app)",
            f"{data['app_cpu_ms_per_call']:.2f} vs {data['bare_cpu_ms_per_call']:.2f} "
            f"({data['bare_cpu_ms_per_call'] / data['app_cpu_ms_per_call']:.2f})",
            "",
            "",
        ),
        (
            "1 ack",
            "load generator CPU during the bare runs (1.0 = one core: client-bound)",
            f"{data['client_cpu_bare']:.2f}",
            "< 0.9",
            _met(data["client_cpu_bare"] < 0.9),
        ),
        (
            "1 ack",
            "latency p50 / p99, app vs bare (ms)",
            f"{data['app_latency_ms']['p50']:.1f} / {data['app_latency_ms']['p99']:.1f} vs "
            f"{data['bare_latency_ms']['p50']:.1f} / {data['bare_latency_ms']['p99']:.1f}",
            "",
            "",
        ),
    ]


def _durable_rows(data: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    rates = ", ".join(
        f"{a:.0f}/{b:.0f}" for a, b in zip(data["full_rates"], data["normal_rates"], strict=True)
    )
    return [
        (
            "1b durable",
            f"FULL + group commit: calls/s (median of {data['rounds']} rounds)",
            f"{data['full_rate']:.0f}",
            "",
            "",
        ),
        ("1b durable", "NORMAL (before): calls/s", f"{data['normal_rate']:.0f}", "", ""),
        (
            "1b durable",
            "**FULL / NORMAL** (median of the rounds' ratios)",
            f"**{data['ratio']:.2f}**",
            f"≥ {TARGETS['durable_ratio']}",
            _met(data["ratio"] >= TARGETS["durable_ratio"]),
        ),
        ("1b durable", "rounds FULL/NORMAL calls/s", rates, "", ""),
    ]


def _burst_rows(data: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    naive = data["naive"]
    n = data["calls"]
    return [
        ("2 burst", f"calls; bucket {data['burst']} + {data['drain']:g}/s", f"{n}", "", ""),
        ("2 burst", "arrival: calls delivered (s)", f"{data['arrival_s']:.2f}", "", ""),
        (
            "2 burst",
            f"bucket floor for {2 * math.ceil(n / BATCH)} requests (s)",
            f"{data['bucket_floor_s']:.2f}",
            "",
            "",
        ),
        ("2 burst", "wall: first call → last answer (s)", f"{data['wall_s']:.2f}", "", ""),
        (
            "2 burst",
            "**wall / floor**",
            f"**{data['wall_over_floor']:.2f}**",
            f"≤ {TARGETS['burst_wall_over_floor']}",
            _met(data["wall_over_floor"] <= TARGETS["burst_wall_over_floor"]),
        ),
        (
            "2 burst",
            "**REST requests per call**",
            f"**{data['requests_per_call']:.3f}** "
            f"({data['rest_requests']} requests, {data['rate_limited']} 503s)",
            f"≤ {TARGETS['burst_requests_per_call']}",
            _met(data["requests_per_call"] <= TARGETS["burst_requests_per_call"]),
        ),
        ("2 burst", "answered with a contact", f"{data['answered_with_contact']} / {n}", f"{n}", ""),
        ("2 burst", "naive: wall (s)", f"{naive['wall_s']:.2f}", "", ""),
        (
            "2 burst",
            "naive: REST requests per call",
            f"{naive['requests_per_call']:.2f} "
            f"({naive['rest_requests']} requests, {naive['rate_limited']} 503s)",
            "",
            "",
        ),
        ("2 burst", "naive wall / app wall", f"{data['naive_over_app_wall']:.1f}×", "", ""),
    ]


def _growth_rows(data: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    rows = []
    for entry in data["sizes"]:
        rows.append(
            (
                "3 growth",
                f"{entry['queued']:,} queued: ms per call (median of {entry['runs']}) · peak RSS",
                f"{entry['ms_per_call']:.2f} ms ({entry['time_ratio']:.2f}× the first; "
                f"{entry['cpu_ms_per_call']:.2f} ms CPU) · "
                f"{entry['peak_rss_mb']:.1f} MB (start {entry['rss_start_mb']:.1f})",
                "",
                "",
            )
        )
    last = data["sizes"][-1]
    rows.append(
        (
            "3 growth",
            f"**time per call, {last['queued']:,} / {data['sizes'][0]['queued']:,}**",
            f"**{last['time_ratio']:.2f}**",
            f"≤ {TARGETS['growth_time_ratio']} (flat)",
            _met(last["time_ratio"] <= TARGETS["growth_time_ratio"]),
        )
    )
    rows.append(
        (
            "3 growth",
            f"**peak RSS with {last['queued']:,} queued**",
            f"**{last['peak_rss_mb']:.1f} MB**",
            f"< {TARGETS['growth_peak_rss_mb']:g} MB",
            _met(last["peak_rss_mb"] < TARGETS["growth_peak_rss_mb"]),
        )
    )
    return rows


def _profile_rows(data: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    if "skipped" in data:
        return [("4 profile", "profile", data["skipped"], "", "")]
    rows = [
        (
            "4 profile",
            "in-process ack (ASGI): calls/s, and under the profiler",
            f"{data['rate']:.0f}, {data['rate_profiled']:.0f}",
            "",
            "",
        )
    ]
    for name, share in data["categories"][:6]:
        rows.append(
            ("4 profile", f"share of the app's main-thread time: {name}", f"{share * 100:.0f} %", "", "")
        )
    return rows


ROWS: dict[str, Callable[[dict[str, Any]], list[tuple[str, str, str, str, str]]]] = {
    "ack": _ack_rows,
    "durable": _durable_rows,
    "burst": _burst_rows,
    "growth": _growth_rows,
    "profile": _profile_rows,
    "attack": attack_rows,
    "two": two_rows,
    "modes": modes.rows,
}


def render(results: dict[str, Any], command: str, meta: dict[str, Any]) -> str:
    lines = [
        "# Benchmark: robot handler",
        "",
        f"Command: `{command}`  ",
        f"When: {meta['when']} · {meta['cpus']} CPUs · Python {meta['python']} · {meta['platform']}  ",
        f"Total time: {meta['seconds']:.0f} s. Ratios compare figures measured in this same run.",
        "",
        "| scenario | figure | value | target | result |",
        "|---|---|---|---|---|",
    ]
    for name, data in results.items():
        if "error" in data:
            lines.append(f"| {name} | could not be measured | {data['error']} | | **failed** |")
            continue
        lines += [f"| {' | '.join(row)} |" for row in ROWS[name](data)]
    lines += ["", "Notes:", *[f"- {note}" for note in NOTES]]
    profile = results.get("profile", {})
    if profile.get("report"):
        lines += ["", "## Where the acknowledgement time goes", "", "```text", profile["report"], "```"]
    return "\n".join(lines) + "\n"


NOTES = (
    "ack: the fake portal is held, so robot calls are verified and journaled but no REST request "
    "completes. Both servers get the same request bytes: a real portal body whose workflow id (and "
    "so event token) the load generator stamps with a counter, over 32 keep-alive connections from "
    "its own process, for the same time per round; rounds alternate which server goes first. One "
    "uvicorn worker each, `--no-access-log`, LOG_LEVEL=INFO. Server CPU per call (from /proc) is "
    "steadier than the rate when the machine is busy.",
    "durable: as ack, the app at synchronous=FULL (the default; each commit is fsynced, calls that "
    "arrive together share one commit) against the same code at NORMAL (bench/normal_app.py), in "
    "the scratch directory's file system.",
    "burst: the app's bucket is set to the portal's (RATE_LIMIT_BURST/RATE_LIMIT_PER_SECOND); floor = "
    "max(arrival, bucket time for 2·⌈N/50⌉ requests); wall is measured by polling the fake's stats "
    "(every 20 ms), so it is an upper bound. The naive client sends crm.contact.add and "
    "bizproc.event.send per call, one stream, backing off on QUERY_LIMIT_EXCEEDED.",
    "growth: a fresh app per run, portal held; sizes interleaved over rounds (100 three times a "
    "round), medians reported; time per call = elapsed / calls with 32 concurrent clients (the "
    "inverse of the rate); peak RSS = VmHWM of the uvicorn process (Linux).",
    "profile: in-process (ASGI transport), so the HTTP server is not in it; see the profile section.",
    "attack: one app, portal held; genuine calls as in ack (32 connections, 4 s) while each attack "
    "runs from threads of the bench process, after 1 s of it; the ratio is to the mean of the runs "
    "without an attack before and after. RSS of the app before, at the end of, and 2 s after each "
    "attack.",
    "modes: as burst, once per `duplicates` mode, without the naive client; floor = max(arrival, bucket "
    "time for the fewest requests the design needs: per pass of 100 calls a search (not in create) "
    "and a read (when anyone is found), adds and answers 50 a batch; 40 to 50 requests, within the "
    "bucket's 50, so the arrival is the floor). 'found' runs call again for the people of the "
    "create run. CPU s: the app's and the fake portal's CPU time during the run (/proc); both share "
    "the CPUs.",
)


def _print_summary(text: str) -> None:
    print()
    print(text)


def write_results(results: dict[str, Any], command: str, meta: dict[str, Any]) -> str:
    text = render(results, command, meta)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "latest.md").write_text(text)
    payload = {"command": command, "meta": meta, "targets": TARGETS, "results": results}
    (RESULTS / "latest.json").write_text(json.dumps(payload, indent=2, ensure_ascii=False))
    return text
