"""Run the app as a real uvicorn process, for tests that kill it or run several of it."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.fake_portal import FakePortal

PROJECT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def app_env(portal: FakePortal, app_url: str, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("BITRIX_", "APP_"))}
    env.update(
        BITRIX_CLIENT_ID=portal.config.client_id,
        BITRIX_CLIENT_SECRET=portal.config.client_secret,
        BITRIX_PORTAL_URL=portal.url,
        BITRIX_OAUTH_URL=portal.url,
        APP_BASE_URL=app_url,
        BATCH_LINGER_SECONDS="0.01",
        PYTHONPATH=str(PROJECT),
    )
    env.update(extra)
    return env


def _limit_files(soft: int) -> None:
    import resource  # POSIX only, like the file limit it sets

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


class AppProcess:
    """`python -m uvicorn main:app` in `workdir` (so its state files land there)."""

    def __init__(
        self,
        workdir: Path,
        env: dict[str, str],
        port: int,
        log: Path,
        workers: int = 1,
        ready_timeout: float = 20.0,
        file_limit: int | None = None,
    ) -> None:
        """`file_limit`: start with this soft limit on open files (as many systems' 1,024; POSIX)."""
        self.url = f"http://127.0.0.1:{port}"
        self._log = log.open("ab")
        command = [sys.executable, "-m", "uvicorn", "main:app", "--app-dir", str(PROJECT)]
        command += ["--host", "127.0.0.1", "--port", str(port), "--no-access-log", "--workers", str(workers)]
        preexec = None if file_limit is None else (lambda: _limit_files(file_limit))
        self.process = subprocess.Popen(
            command, cwd=workdir, env=env, stdout=self._log, stderr=self._log, preexec_fn=preexec
        )
        self._wait_ready(ready_timeout)

    def _wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the app exited with {self.process.returncode}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("the app did not start")

    def kill_9(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)
        self._log.close()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()
