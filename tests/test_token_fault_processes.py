"""Worker processes and an unsaved rotated pair: while one process holds a pair the disk refused,
no other process sends a refresh with the dead token on disk; they use the pair once it is saved.
And with `--workers 2` renewing ahead of time, no refresh is ever refused."""

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import make_settings, write_installed_portal
from tests.fake_portal import FakePortal
from tests.processes import PROJECT, AppProcess, app_env, free_port
from tests.storage_faults import TinyTmpfs

HOLDER = """
import asyncio, sys
import httpx
from config import Settings
from repositories.token_store import JsonTokenStore, TokenStoreError
from services.bitrix_client import BitrixClient
from services.rate_limit import PortalRateLimiter

settings = Settings(_env_file=None)

async def main() -> None:
    async with httpx.AsyncClient() as http:
        store = JsonTokenStore(settings.token_file)
        client = BitrixClient(http, store, settings, PortalRateLimiter(50, 50))
        print((await client.call(sys.argv[1], "app.info"))["CODE"], flush=True)
        # Keep trying to save the kept pair, as the app's token upkeep does.
        while store.unsaved():
            try:
                await store.flush()
            except TokenStoreError:
                await asyncio.sleep(0.1)
        print("saved", flush=True)

asyncio.run(main())
"""

USER = """
import asyncio, sys
import httpx
from config import Settings
from repositories.token_store import JsonTokenStore
from services.bitrix_client import BitrixClient
from services.rate_limit import PortalRateLimiter

settings = Settings(_env_file=None)

async def main() -> None:
    async with httpx.AsyncClient() as http:
        client = BitrixClient(http, JsonTokenStore(settings.token_file), settings, PortalRateLimiter(50, 50))
        print("calling", flush=True)
        print((await client.call(sys.argv[1], "app.info"))["CODE"], flush=True)

asyncio.run(main())
"""


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[TinyTmpfs]:
    with TinyTmpfs(tmp_path / "disk") as mounted:
        yield mounted


def _stored_refresh(token_file: Path, member_id: str) -> str:
    refresh: str = json.loads(token_file.read_text())["portals"][member_id]["refresh_token"]
    return refresh


def _start(script: str, portal: FakePortal, token_file: Path) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-c", script, portal.config.member_id]
    env = app_env(portal, "http://127.0.0.1:9", TOKEN_FILE=str(token_file))
    return subprocess.Popen(argv, cwd=PROJECT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _line(process: subprocess.Popen[bytes]) -> str:
    assert process.stdout is not None
    return process.stdout.readline().decode().strip()


def test_no_process_refreshes_while_another_holds_an_unsaved_pair(
    tmp_path: Path, portal: FakePortal, disk: TinyTmpfs
) -> None:
    token_file = disk.path / "tokens.json"
    dead = write_installed_portal(portal, token_file).refresh_token
    portal.expire_access_tokens()
    disk.fill()

    holder = _start(HOLDER, portal, token_file)
    try:
        assert _line(holder) == portal.config.client_id, holder.stderr.read() if holder.stderr else ""
        assert portal.stats["refreshes"] == 1
        assert _stored_refresh(token_file, portal.config.member_id) == dead

        user = _start(USER, portal, token_file)
        assert _line(user) == "calling"
        # The other process finds the dead token on disk and an expired access token; it waits.
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            assert user.poll() is None
            time.sleep(0.1)
        assert portal.stats["token_requests"] == 1

        disk.free()
        assert _line(holder) == "saved"
        out, err = user.communicate(timeout=60)
        assert out.decode().strip() == portal.config.client_id, err.decode()
        assert portal.stats["refreshes"] == 1
        assert portal.refresh_token_alive(_stored_refresh(token_file, portal.config.member_id))
    finally:
        holder.kill()
        holder.wait(10)


def test_renewals_from_two_worker_processes_are_never_refused(tmp_path: Path, portal: FakePortal) -> None:
    settings = make_settings(tmp_path, portal)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = app_env(portal, url, TOKEN_RENEW_AFTER_SECONDS="0.3")
    app = AppProcess(tmp_path, env, port, tmp_path / "app.log", workers=2)
    try:
        body = portal.install_event_body()
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        assert httpx.post(f"{url}/install", content=body, headers=headers, timeout=30).status_code == 200
        deadline = time.monotonic() + 60
        while portal.stats["refreshes"] < 8:
            assert time.monotonic() < deadline, (tmp_path / "app.log").read_text()
            time.sleep(0.1)
    finally:
        app.stop()

    assert not any("invalid_grant" in error for error in portal.recent_errors), portal.recent_errors
    assert portal.refresh_token_alive(_stored_refresh(settings.token_file, portal.config.member_id))
