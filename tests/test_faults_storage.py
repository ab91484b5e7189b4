"""Storage faults: a full disk gives 503 `storage_error` and `/health` says "down", never a 500."""

import asyncio
import errno
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from asgi_lifespan import LifespanManager

from config import Settings, get_settings
from main import create_app
from tests.conftest import APP_URL, answer_for, make_settings, post_form
from tests.fake_portal import FakePortal

pytestmark = pytest.mark.anyio


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB tmpfs: a disk that can really fill up (needs root, as CI and this machine have)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    command = ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(mount_point)]
    mounted = subprocess.run(command, capture_output=True, check=False)
    if mounted.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs to fill (run the suite as root): {mounted.stderr.decode()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(disk: Path) -> Path:
    """Write until the disk is full; the file that filled it."""
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as handle:
        while True:
            try:
                handle.write(b"\0" * 4096)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                return filler


@pytest.fixture
async def app_on_small_disk(
    tmp_path: Path, portal: FakePortal, small_disk: Path
) -> AsyncIterator[tuple[httpx.AsyncClient, Settings]]:
    settings = make_settings(tmp_path, portal, job_db_file=small_disk / "jobs.sqlite3")
    app = create_app()
    app.dependency_overrides[get_settings] = lambda: settings
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url=APP_URL) as client:
            response = await post_form(client, "/install", portal.install_event_body())
            assert response.status_code == 200
            yield client, settings


@pytest.mark.skipif(sys.platform != "linux", reason="tmpfs is Linux")
async def test_a_full_disk_refuses_calls_with_503_and_health_says_down_until_it_has_room(
    app_on_small_disk: tuple[httpx.AsyncClient, Settings], portal: FakePortal, small_disk: Path
) -> None:
    client, settings = app_on_small_disk
    filler = fill(small_disk)

    _, body = portal.robot_call_body({"first_name": "Ivan"})
    robot = await post_form(client, "/robot", body)
    login = await client.get("/oauth/login")
    health = await client.get("/health")

    for response in (robot, login):
        assert response.status_code == 503, response.text
        assert response.json()["error"] == "storage_error"
        assert str(settings.job_db_file) in response.json()["detail"]
        assert "full" in response.json()["detail"]
    assert health.status_code == 503
    assert health.json()["status"] == "down"
    assert any(str(settings.job_db_file) in reason for reason in health.json()["reasons"])

    filler.unlink()
    token, body = portal.robot_call_body({"first_name": "Ivan"})
    assert (await post_form(client, "/robot", body)).status_code == 200
    await answer_for(portal, token)
    health = await client.get("/health")
    assert health.status_code == 200
    assert health.json()["status"] == "ok", health.json()


async def test_health_is_degraded_with_reasons_before_install(client: httpx.AsyncClient) -> None:
    response = await client.get("/health")

    assert response.status_code == 200
    assert response.json()["status"] == "degraded"
    assert response.json()["reasons"] == ["No portal is installed: install the app in Bitrix24."]


async def test_health_is_degraded_while_jobs_fail(installed: httpx.AsyncClient, portal: FakePortal) -> None:
    portal.fail_next("bizproc.event.send", 400, "ERROR_WRONG_EVENT", "Unknown event token", times=5)
    token, body = portal.robot_call_body({"first_name": "Ivan"})
    await post_form(installed, "/robot", body)

    async def failed() -> bool:
        return bool((await installed.get("/health")).json()["queue"]["failed"])

    for _ in range(500):
        if await failed():
            break
        await asyncio.sleep(0.02)
    health = (await installed.get("/health")).json()

    assert health["status"] == "degraded"
    assert any("failed" in reason for reason in health["reasons"])
    assert token not in portal.answers
