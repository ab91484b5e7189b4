"""Two worker processes refreshing the same portal's token at once cause exactly one refresh."""

import json
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import make_settings, write_installed_portal
from tests.fake_portal import FakePortal
from tests.processes import PROJECT, app_env

SCRIPT = """
import asyncio, sys, time
import httpx
from config import Settings
from repositories.token_store import JsonTokenStore
from services.bitrix_client import BitrixClient
from services.rate_limit import PortalRateLimiter

settings = Settings(_env_file=None)
start_at = float(sys.argv[1])

async def main() -> None:
    async with httpx.AsyncClient() as http:
        client = BitrixClient(http, JsonTokenStore(settings.token_file), settings, PortalRateLimiter(50, 50))
        time.sleep(max(0.0, start_at - time.time()))
        results = await asyncio.gather(*(client.call(sys.argv[2], "app.info") for _ in range(5)))
        print(results[0]["CODE"])

asyncio.run(main())
"""


def test_two_processes_refresh_once_and_leave_a_readable_file(tmp_path: Path, portal: FakePortal) -> None:
    settings = make_settings(tmp_path, portal)
    installed = write_installed_portal(portal, settings.token_file)
    portal.expire_access_tokens()
    start_at = str(time.time() + 1.5)
    argv = [sys.executable, "-c", SCRIPT, start_at, portal.config.member_id]
    env = app_env(portal, "http://127.0.0.1:9", TOKEN_FILE=str(settings.token_file))

    workers = [
        subprocess.Popen(argv, cwd=PROJECT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    outputs = [worker.communicate(timeout=60) for worker in workers]

    assert [w.returncode for w in workers] == [0, 0], outputs
    assert all(out.decode().strip() == portal.config.client_id for out, _ in outputs)
    assert portal.stats["refreshes"] == 1
    stored = json.loads(settings.token_file.read_text())["portals"][portal.config.member_id]
    assert stored["refresh_token"] != installed.refresh_token
