"""The benchmark's harness: the plan, child processes, the fake portal, the servers under test, Bench."""

from __future__ import annotations

import asyncio
import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qsl

import httpx

from bench.bodies import properties, template_bodies
from config import Settings
from tests.fake_portal import FakePortalConfig

PROJECT = Path(__file__).resolve().parent.parent
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
        self.database_cpu: Callable[[], float] | None = None  # the database server's CPU seconds
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
