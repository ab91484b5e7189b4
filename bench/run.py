"""Benchmark of the robot handler, in one command: `python bench/run.py` (`--quick` for a smoke run).

Every figure is a ratio measured within this one run, because absolute times on a shared machine
mean little. Scenarios (`--only NAME`, repeatable):

* ack     - acknowledgement rate of POST /robot (portal held, so the work only queues) against a
            bare FastAPI app that only parses the form, both served by uvicorn the same way;
* durable - the same acknowledgement rate with the journal's durable commits (synchronous=FULL,
            group commit) against the same app at synchronous=NORMAL (bench/normal_app.py);
* burst   - 1,000 robot calls against the fake portal with a rate limit on (burst 50, faster
            drain): wall time against the floor the bucket allows, REST requests per call, and a
            naive baseline (one REST request per command) measured in the same run;
* growth  - 100, 1,000 and 10,000 queued calls: time per call and peak RSS of the app;
* profile - where the acknowledgement time goes (pyinstrument; skipped when not installed);
* attack  - genuine calls per second under each attack, against none (bench/attacks.py);
* modes   - the burst in each find-or-create mode (`duplicates` input; see bench/modes.py).

The fake portal, the app, the bare app, the load generator and the naive client each run in their
own process, on 127.0.0.1 only. Results: printed, and written to bench/results/latest.{md,json}.
Peak memory is read from /proc (Linux).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from datetime import datetime
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

import httpx

PROJECT = Path(__file__).resolve().parent.parent
if str(PROJECT) not in sys.path:  # `python bench/run.py` puts only bench/ on the path
    sys.path.insert(0, str(PROJECT))

from bench import modes  # noqa: E402
from bench.ack import scenario_ack, scenario_durable  # noqa: E402
from bench.attacks import scenario_attack  # noqa: E402
from bench.burst import scenario_burst  # noqa: E402
from bench.growth import scenario_growth  # noqa: E402
from bench.harness import FULL, QUICK, RESULTS, Bench, BenchError, Plan, Portal, Processes  # noqa: E402
from bench.postgres import scenario_two, server_cpu_seconds  # noqa: E402
from bench.profiling import scenario_profile  # noqa: E402
from bench.report import _print_summary, write_results  # noqa: E402
from tests.pg_server import TestPostgres  # noqa: E402

SCENARIOS: dict[str, Callable[[Bench], dict[str, Any]]] = {
    "ack": scenario_ack,
    "durable": scenario_durable,
    "burst": scenario_burst,
    "growth": scenario_growth,
    "profile": scenario_profile,
    "attack": scenario_attack,
    "two": scenario_two,
    "modes": modes.scenario_modes,
}


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a small smoke run (about a minute)")
    parser.add_argument("--only", action="append", choices=sorted(SCENARIOS), help="run only this scenario")
    parser.add_argument("--drain", type=float, help="the fake's bucket drain per second for burst")
    parser.add_argument("--concurrency", type=int, help="client connections (default 32)")
    parser.add_argument(
        "--database", choices=("embedded", "postgresql"), default="embedded", help="the app's back end"
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (logs, bodies)")
    return parser.parse_args(argv)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _run(plan: Plan, names: Sequence[str], workdir: Path, database: str = "embedded") -> dict[str, Any]:
    processes = Processes()
    results: dict[str, Any] = {}
    portal: Portal | None = None
    server: TestPostgres | None = None
    try:
        portal = Portal(processes, workdir, plan.drain)
        bench = Bench(plan, processes, portal, workdir)
        if database == "postgresql":
            server = TestPostgres()
            bench.database = server.new_database
            bench.database_cpu = partial(server_cpu_seconds, server.pgdata)
        for name in names:
            print(f"== {name}", flush=True)
            started = time.monotonic()
            try:
                results[name] = SCENARIOS[name](bench)
            except (BenchError, httpx.HTTPError) as exc:
                print(f"  {name} failed: {exc}", flush=True)
                results[name] = {"error": str(exc)}
            print(f"  ({time.monotonic() - started:.0f} s)", flush=True)
    finally:
        if portal is not None:
            portal.close()
        processes.stop_all()
        if server is not None:
            server.stop()
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    if not sys.platform.startswith("linux"):
        print("note: peak RSS is read from /proc and is Linux-only", file=sys.stderr)
    plan = QUICK if args.quick else FULL
    if args.drain:
        plan = replace(plan, drain=args.drain)
    if args.concurrency:
        plan = replace(plan, concurrency=args.concurrency)
    # Two instances need a shared database: the "two" scenario runs only with --database postgresql.
    wanted = [name for name in SCENARIOS if name != "two" or args.database == "postgresql"]
    names = [name for name in wanted if not args.only or name in args.only]
    command = shlex.join(["python", "bench/run.py", *(argv if argv is not None else sys.argv[1:])])
    signal.signal(signal.SIGTERM, _on_sigterm)
    workdir = Path(tempfile.mkdtemp(prefix="bitrix24-bench-"))
    started = time.monotonic()
    print(f"{command}  (scratch: {workdir})", flush=True)
    try:
        results = _run(plan, names, workdir, args.database)
    except KeyboardInterrupt:
        print(f"\ninterrupted; every child process is stopped. Scratch kept: {workdir}", file=sys.stderr)
        return 130
    meta = {
        "when": datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "seconds": time.monotonic() - started,
        "plan": asdict(plan),
    }
    _print_summary(write_results(results, command, meta))
    print(f"written: {RESULTS / 'latest.md'} and latest.json")
    failed = any("error" in data for data in results.values())
    if failed or args.keep:
        print(f"scratch kept: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
