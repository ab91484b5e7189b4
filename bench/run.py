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
import asyncio
import importlib.util
import json
import math
import os
import platform
import random
import select
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import IO, Any
from urllib.parse import parse_qsl, quote_plus

import httpx

PROJECT = Path(__file__).resolve().parent.parent
if str(PROJECT) not in sys.path:  # `python bench/run.py` puts only bench/ on the path
    sys.path.insert(0, str(PROJECT))

from bench import modes  # noqa: E402
from bench.attacks import attack_rows, scenario_attack  # noqa: E402
from bench.postgres import export_tokens, scenario_two, two_rows  # noqa: E402
from config import Settings  # noqa: E402
from tests.fake_portal import FakePortalConfig  # noqa: E402
from tests.pg_server import TestPostgres  # noqa: E402

RESULTS = PROJECT / "bench" / "results"
HOST = "127.0.0.1"
BURST = 50  # the cloud bucket's size (wire doc 4.1)
BATCH = 50  # commands per `batch` request (wire doc 4.3)
TARGETS = {
    "ack_ratio": 0.7,
    "durable_ratio": 0.9,
    "burst_wall_over_floor": 1.2,
    "burst_requests_per_call": 0.05,
    "growth_peak_rss_mb": 120.0,
    "growth_time_ratio": 1.2,
}


class BenchError(Exception):
    """A scenario could not be measured; the message says why."""


@dataclass(frozen=True)
class Plan:
    ack_seconds: float = 4.0  # timed load per round and target
    ack_rounds: int = 3
    ack_warmup: int = 200
    durable_rounds: int = 6  # FULL and NORMAL alternate; the median of the per-round ratios counts
    burst_calls: int = 1000
    drain: float = 50.0  # the fake's bucket drain per second in the burst scenario
    growth_sizes: tuple[int, ...] = (100, 1000, 10000)
    growth_warmup: int = 32
    growth_rounds: int = 4
    profile_calls: int = 3000
    concurrency: int = 32


FULL = Plan()
QUICK = Plan(
    ack_seconds=1.5,
    ack_rounds=1,
    ack_warmup=50,
    durable_rounds=2,
    burst_calls=200,
    growth_sizes=(100, 1000),
    growth_warmup=16,
    growth_rounds=1,
    profile_calls=300,
)


# --------------------------------------------------------------------------------------------
# Processes: every child is registered and always stopped, also on Ctrl-C
# --------------------------------------------------------------------------------------------


class Processes:
    """The children this run started; `stop_all` ends each of them, by its own handle."""

    def __init__(self) -> None:
        self._running: list[tuple[subprocess.Popen[bytes], IO[bytes]]] = []

    def start(
        self, command: Sequence[str], *, cwd: Path, env: dict[str, str], log: Path, pipe_stdout: bool = False
    ) -> subprocess.Popen[bytes]:
        handle = log.open("ab")
        stdout: int | IO[bytes] = subprocess.PIPE if pipe_stdout else handle
        try:
            process = subprocess.Popen(list(command), cwd=cwd, env=env, stdout=stdout, stderr=handle)
        except BaseException:
            handle.close()
            raise
        self._running.append((process, handle))
        return process

    def stop(self, process: subprocess.Popen[bytes]) -> None:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        for entry in [e for e in self._running if e[0] is process]:
            self._running.remove(entry)
            entry[1].close()
            if process.stdout is not None:
                process.stdout.close()

    def stop_all(self) -> None:
        for process, _ in reversed(list(self._running)):
            self.stop(process)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _clean_env() -> dict[str, str]:
    """This environment without any of the app's settings, so only what we pass counts."""
    settings = {name.upper() for name in Settings.model_fields}
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("BITRIX_", "APP_")) and key not in settings
    }
    env["PYTHONPATH"] = str(PROJECT)
    return env


def _read_ready_line(process: subprocess.Popen[bytes], timeout: float) -> str:
    assert process.stdout is not None
    deadline, buffer = time.monotonic() + timeout, b""
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchError(f"the fake portal exited with {process.returncode} at startup")
        ready, _, _ = select.select([process.stdout], [], [], 0.2)
        if ready:
            buffer += os.read(process.stdout.fileno(), 4096)
            for line in buffer.decode(errors="replace").splitlines():
                if line.startswith("FAKE_PORTAL_READY "):
                    return line.split(" ", 1)[1].strip()
    raise BenchError("the fake portal did not print FAKE_PORTAL_READY in time")


# --------------------------------------------------------------------------------------------
# The fake portal (a subprocess) and its control API
# --------------------------------------------------------------------------------------------


class Portal:
    """`python -m tests.fake_portal` with the cloud bucket shape, driven through /_fake/."""

    def __init__(self, processes: Processes, workdir: Path, drain: float) -> None:
        command = [sys.executable, "-m", "tests.fake_portal", "--port", str(free_port())]
        command += ["--rate-burst", str(BURST), "--rate-drain", str(drain)]
        self.process = processes.start(
            command, cwd=PROJECT, env=_clean_env(), log=workdir / "fake_portal.log", pipe_stdout=True
        )
        self.url = _read_ready_line(self.process, 20.0)
        self.http = httpx.Client(base_url=self.url, timeout=30.0)

    def close(self) -> None:
        self.http.close()

    def control(self, path: str, payload: dict[str, Any] | None = None) -> Any:
        response = self.http.post(f"/_fake/{path}", json=payload or {})
        response.raise_for_status()
        return response.json()

    def stats(self) -> dict[str, Any]:
        response = self.http.get("/_fake/stats")
        response.raise_for_status()
        data: dict[str, Any] = response.json()
        return data

    def answers(self) -> dict[str, Any]:
        response = self.http.get("/_fake/answers")
        response.raise_for_status()
        data: dict[str, Any] = response.json()
        return data

    def hold(self) -> None:
        self.control("hold")

    def release(self) -> None:
        self.control("release")

    def rate_limit(self, burst: int | None, drain: float) -> None:
        self.control("rate-limit", {"burst": burst, "drain": drain})

    def install_body(self) -> str:
        return str(self.control("install-body")["body"])

    def robot_body(self, index: int) -> tuple[str, str]:
        reply = self.control("robot-body", {"properties": properties(index)})
        return str(reply["event_token"]), str(reply["body"])

    def robot_bodies(self, count: int, offset: int) -> list[tuple[str, str]]:
        """`count` real robot calls, each with its own event token that the portal now waits on."""
        return asyncio.run(self._robot_bodies(count, offset))

    async def _robot_bodies(self, count: int, offset: int) -> list[tuple[str, str]]:
        gate = asyncio.Semaphore(8)
        async with httpx.AsyncClient(base_url=self.url, timeout=30.0) as client:

            async def one(index: int) -> tuple[str, str]:
                async with gate:
                    reply = await client.post("/_fake/robot-body", json={"properties": properties(index)})
                reply.raise_for_status()
                data = reply.json()
                return str(data["event_token"]), str(data["body"])

            return list(await asyncio.gather(*(one(offset + i) for i in range(count))))


_LAST = ("Иванов", "Петрова", "Smirnov", "Кузнецова", "O'Brien", "Попов", "Sokolova", "Лебедев")
_FIRST = ("Иван", "Мария", "Alexei", "Анна", "Sean", "Дмитрий", "Elena", "Ольга")
_MIDDLE = ("Иванович", "Петровна", "", "Сергеевна", "", "Андреевич", "Olegovna", "")


def properties(index: int) -> dict[str, str]:
    """Well-formed robot inputs, different for every call (the heavier path: a contact to make)."""
    pick = index % len(_LAST)
    number = f"{1_000_000 + index % 9_000_000:07d}"
    return {
        "last_name": _LAST[pick],
        "first_name": _FIRST[pick],
        "second_name": _MIDDLE[pick],
        "phone": f"+7 (999) {number[:3]}-{number[3:5]}-{number[5:]}",
        "email": f"client.{index}@example.com",
    }


def _php_encode(pairs: Sequence[tuple[str, str]]) -> str:
    def quote(text: str) -> str:
        return quote_plus(text, safe="").replace("~", "%7E")  # PHP's urlencode()

    return "&".join(f"{quote(key)}={quote(value)}" for key, value in pairs)


def template_bodies(template: str, count: int, offset: int) -> list[str]:
    """Copies of a real portal body with fresh workflow ids, event tokens and inputs.

    For the held-portal scenarios only: the portal never sees these tokens, the app accepts them
    as it would any call of the installed portal. Much faster than asking the fake for each.
    """
    rng = random.Random(offset)
    base = [(k, v) for k, v in parse_qsl(template, keep_blank_values=True) if not k.startswith("properties")]
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    bodies = []
    for index in range(offset, offset + count):
        workflow = f"{rng.getrandbits(56):014x}.{rng.randrange(10**8):08d}"
        activity = "A" + "_".join(f"{rng.randrange(10**5):05d}" for _ in range(4))
        salt = "".join(rng.choice(alphabet) for _ in range(32))
        token = f"{workflow}|{activity}|{salt}.{rng.getrandbits(256):064x}"
        pairs: list[tuple[str, str]] = []
        for key, value in base:
            replaced = {"workflow_id": workflow, "event_token": token}.get(key, value)
            pairs.append((key, replaced))
            if key == "event_token":  # the portal puts the inputs right after the token
                pairs += [(f"properties[{name}]", text) for name, text in properties(index).items()]
        bodies.append(_php_encode(pairs))
    return bodies


# --------------------------------------------------------------------------------------------
# Servers under test: the app and the bare FastAPI app, both `uvicorn ... --no-access-log`
# --------------------------------------------------------------------------------------------


class Server:
    """One uvicorn process (a single worker) in its own working directory."""

    def __init__(
        self, processes: Processes, target: str, workdir: Path, env: dict[str, str], port: int
    ) -> None:
        self.processes, self.workdir, self.port = processes, workdir, port
        self.url = f"http://{HOST}:{port}"
        command = [sys.executable, "-m", "uvicorn", target, "--app-dir", str(PROJECT)]
        command += ["--host", HOST, "--port", str(port), "--no-access-log"]
        workdir.mkdir(parents=True, exist_ok=True)
        self.log = workdir / "server.log"
        self.process = processes.start(command, cwd=workdir, env=env, log=self.log)

    def wait_ready(self, path: str | None, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BenchError(f"{self.url} exited with {self.process.returncode}; see {self.log}")
            try:
                if path is None:
                    with httpx.Client(timeout=1.0) as client:
                        client.get(self.url + "/")  # any answer means it serves
                    return
                if httpx.get(self.url + path, timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise BenchError(f"{self.url} did not start within {timeout}s; see {self.log}")

    def memory_kb(self) -> dict[str, int]:
        """VmRSS and VmHWM (peak RSS) of the server process, from /proc (Linux only)."""
        status = Path(f"/proc/{self.process.pid}/status")
        if not status.exists():
            return {}
        values: dict[str, int] = {}
        for line in status.read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                values[name] = int(rest.split()[0])
        return values

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far, all threads (Linux /proc)."""
        stat = Path(f"/proc/{self.process.pid}/stat")
        if not stat.exists():
            return 0.0
        fields = stat.read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.processes.stop(self.process)


class Bench:
    """Shared state of one run: the plan, the portal, the children and a scratch directory."""

    def __init__(self, plan: Plan, processes: Processes, portal: Portal, workdir: Path) -> None:
        self.plan, self.processes, self.portal, self.workdir = plan, processes, portal, workdir
        # --database postgresql: a fresh database's URL per app (bench/postgres.py); None: embedded
        self.database: Callable[[], str] | None = None
        self.database_urls: dict[str, str] = {}  # app name → its database
        self._offset = 10_000  # every generated call gets its own index

    def indices(self, count: int) -> int:
        start, self._offset = self._offset, self._offset + count
        return start

    def start_app(self, name: str, app_spec: str = "main:app", **extra_env: str) -> Server:
        """The app, fresh state, installed on the fake portal (which must not be held)."""
        port = free_port()
        defaults = FakePortalConfig()
        env = _clean_env()
        env.update(
            BITRIX_CLIENT_ID=defaults.client_id,
            BITRIX_CLIENT_SECRET=defaults.client_secret,
            BITRIX_PORTAL_URL=self.portal.url,
            BITRIX_OAUTH_URL=self.portal.url,
            APP_BASE_URL=f"http://{HOST}:{port}",
            LOG_LEVEL="INFO",
        )
        if self.database is not None:
            env["DATABASE_URL"] = self.database()
        env.update(extra_env)
        if "DATABASE_URL" in env:
            self.database_urls[name] = env["DATABASE_URL"]
        server = Server(self.processes, app_spec, self.workdir / name, env, port)
        server.wait_ready("/health")
        reply = httpx.post(
            server.url + "/install",
            content=self.portal.install_body(),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
            timeout=30.0,
        )
        if reply.status_code != 200:
            raise BenchError(f"install failed: {reply.status_code} {reply.text[:300]}")
        return server

    def start_bare(self) -> Server:
        server = Server(
            self.processes, "bench.bare_app:app", self.workdir / "bare", _clean_env(), free_port()
        )
        server.wait_ready(None)
        return server

    def bodies_file(self, name: str, bodies: Sequence[str]) -> Path:
        path = self.workdir / f"{name}.bodies"
        path.write_text("\n".join(bodies) + "\n")
        return path

    def template_file(self, name: str, template: str) -> tuple[Path, str]:
        """A real body with a fresh workflow id, for the load generator to stamp a counter into."""
        body = template_bodies(template, 1, self.indices(1))[0]
        path = self.workdir / f"{name}.template"
        path.write_text(body + "\n")
        return path, dict(parse_qsl(body))["workflow_id"]

    def start_loadgen(
        self, server: Server, source: Sequence[str], warmup: int, tag: str, time_limit: float = 120.0
    ) -> tuple[subprocess.Popen[bytes], Path]:
        """The load generator against `server`; `source` names the bodies (see bench/loadgen.py)."""
        out = self.workdir / f"{tag}.json"
        out.unlink(missing_ok=True)
        command = [sys.executable, "-m", "bench.loadgen", "--host", HOST, "--port", str(server.port)]
        command += [*source, "--concurrency", str(self.plan.concurrency), "--warmup", str(warmup)]
        command += ["--time-limit", str(time_limit), "--out", str(out)]
        log = self.workdir / "loadgen.log"
        return self.processes.start(command, cwd=PROJECT, env=_clean_env(), log=log), out

    def finish_loadgen(self, process: subprocess.Popen[bytes], out: Path, timeout: float) -> dict[str, Any]:
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            raise BenchError("the load generator did not finish in time") from exc
        finally:
            self.processes.stop(process)
        if process.returncode != 0 or not out.exists():
            raise BenchError(
                f"the load generator failed ({process.returncode}); see {self.workdir}/loadgen.log"
            )
        result: dict[str, Any] = json.loads(out.read_text())
        return result

    def load(self, server: Server, source: Sequence[str], warmup: int, tag: str) -> dict[str, Any]:
        process, out = self.start_loadgen(server, source, warmup, tag)
        return self.finish_loadgen(process, out, 180.0)


def _require_all_ok(result: dict[str, Any], what: str) -> None:
    if result["ok"] != result["requests"] or result["warmup_ok"] != result["warmup"]:
        raise BenchError(
            f"{what}: only {result['ok']} of {result['requests']} calls got 2xx "
            f"(statuses {result['statuses']}, errors {result['errors'][:3]}, "
            f"reply {result['sample_reply']!r})"
        )


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


# --------------------------------------------------------------------------------------------
# Scenario 4: profile of the acknowledgement path
# --------------------------------------------------------------------------------------------


def scenario_profile(bench: Bench) -> dict[str, Any]:
    if importlib.util.find_spec("pyinstrument") is None:
        message = "skipped: pyinstrument is not installed (pip install -r bench/requirements.txt)"
        print(f"  profile {message}", flush=True)
        return {"skipped": message}
    bench.portal.release()
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = bench.workdir / "profile.json"
    workdir = bench.workdir / "profile"
    workdir.mkdir(exist_ok=True)
    command = [sys.executable, "-m", "bench.profile_ack", "--portal-url", bench.portal.url]
    command += ["--calls", str(bench.plan.profile_calls), "--concurrency", str(bench.plan.concurrency)]
    command += ["--workdir", str(workdir), "--out", str(out), "--report-dir", str(RESULTS)]
    process = bench.processes.start(command, cwd=PROJECT, env=_clean_env(), log=bench.workdir / "profile.log")
    try:
        process.wait(300)
    except subprocess.TimeoutExpired as exc:
        raise BenchError("the profile did not finish in time") from exc
    finally:
        bench.processes.stop(process)
        bench.portal.release()
    if process.returncode != 0 or not out.exists():
        raise BenchError(f"the profile failed ({process.returncode}); see {bench.workdir}/profile.log")
    result: dict[str, Any] = json.loads(out.read_text())
    return result


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
    "time for k·⌈N/50⌉ requests), k = 2 for create (add, answer) and 3 for reuse/update (search, "
    "add or read, answer). 'found' runs call again for the people of the create run.",
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
