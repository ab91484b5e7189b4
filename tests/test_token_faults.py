"""The token file on a full or read-only disk: 503 `storage_error`, and no rotated pair is ever lost."""

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from config import Settings
from repositories.token_store import JsonTokenStore, TokenStoreError
from schemas import PortalTokens
from tests.conftest import answer_for, eventually, make_settings, post_form
from tests.fake_portal import FakePortal
from tests.storage_faults import TinyTmpfs

pytestmark = pytest.mark.anyio

GOOD = {"last_name": "Ivanov", "first_name": "Ivan", "email": "ivan@example.com"}


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[TinyTmpfs]:
    with TinyTmpfs(tmp_path / "disk") as mounted:
        yield mounted


@pytest.fixture
def settings(tmp_path: Path, portal: FakePortal, disk: TinyTmpfs) -> Settings:
    # Only the token file is on the small disk; the job journal stays on the ordinary one.
    # A short lease: a job whose pass stopped at the unsaved pair is taken up again soon.
    return make_settings(tmp_path, portal, token_file=disk.path / "tokens.json", job_lease_seconds=1.0)


def _stored(settings: Settings, portal: FakePortal) -> dict[str, Any]:
    record: dict[str, Any] = json.loads(settings.token_file.read_text())["portals"][portal.config.member_id]
    return record


def _record() -> PortalTokens:
    return PortalTokens(
        member_id="a223c6b3710f85df22e9377d6c4f7553",
        domain="example.bitrix24.ru",
        client_endpoint="https://example.bitrix24.ru/rest/",
        access_token="access-token-0000",
        refresh_token="refresh-token-0000",
    )


@pytest.mark.parametrize(
    ("fault", "cause"), [("read_only", "Read-only file system"), ("fill", "No space left on device")]
)
async def test_store_turns_every_os_error_into_token_store_error(
    disk: TinyTmpfs, fault: str, cause: str
) -> None:
    path = disk.path / "tokens.json"
    store = JsonTokenStore(path)
    await store.save(_record())
    getattr(disk, fault)()

    with pytest.raises(TokenStoreError) as raised:
        await store.save(_record().model_copy(update={"access_token": "access-token-0001"}))
    with pytest.raises(TokenStoreError):
        await store.delete(_record().member_id)

    assert str(path) in str(raised.value)
    assert cause in str(raised.value)
    stored = await JsonTokenStore(path).get(_record().member_id)
    assert stored is not None
    assert stored.access_token == _record().access_token


@pytest.mark.parametrize(
    ("fault", "cause"), [("read_only", "Read-only file system"), ("fill", "No space left on device")]
)
async def test_install_on_a_broken_token_disk_is_503_naming_the_file_and_cause(
    client: httpx.AsyncClient, portal: FakePortal, settings: Settings, disk: TinyTmpfs, fault: str, cause: str
) -> None:
    getattr(disk, fault)()

    response = await post_form(client, "/install", portal.install_event_body())

    assert response.status_code == 503
    assert response.json()["error"] == "storage_error"
    assert str(settings.token_file) in response.json()["detail"]
    assert cause in response.json()["detail"]


async def test_uninstall_on_a_read_only_token_folder_is_503_and_forgets_nothing(
    installed: httpx.AsyncClient, portal: FakePortal, settings: Settings, disk: TinyTmpfs
) -> None:
    before = settings.token_file.read_bytes()
    disk.read_only()

    response = await post_form(installed, "/uninstall", portal.uninstall_event_body(revoke=False))

    assert response.status_code == 503
    assert response.json()["error"] == "storage_error"
    assert str(settings.token_file) in response.json()["detail"]
    assert "Read-only file system" in response.json()["detail"]
    assert settings.token_file.read_bytes() == before


async def test_a_rotated_pair_that_cannot_be_saved_is_kept_used_and_saved_later(
    installed: httpx.AsyncClient, portal: FakePortal, settings: Settings, disk: TinyTmpfs
) -> None:
    dead = _stored(settings, portal)["refresh_token"]
    refreshes = portal.stats["refreshes"]  # the install refreshed once, to learn its member_id
    disk.fill()
    portal.expire_access_tokens()

    # The refresh rotates the pair; the disk refuses it; the call still succeeds with it.
    token, body = portal.robot_call_body(GOOD)
    assert (await post_form(installed, "/robot", body)).status_code == 200
    assert (await answer_for(portal, token))["return_values"]["error"] == ""
    assert portal.stats["refreshes"] == refreshes + 1
    assert _stored(settings, portal)["refresh_token"] == dead
    assert not portal.refresh_token_alive(dead)
    health = (await installed.get("/health")).json()
    assert health["portal_connected"] is True
    assert str(settings.token_file) in health["token_store_error"]
    assert "No space left on device" in health["token_store_error"]

    # The next call uses the pair kept in memory.
    token, body = portal.robot_call_body({**GOOD, "first_name": "Petr"})
    await post_form(installed, "/robot", body)
    assert (await answer_for(portal, token))["return_values"]["error"] == ""

    # Even when that access token expires, no second refresh goes out while the pair is unsaved.
    portal.expire_access_tokens()
    token, body = portal.robot_call_body({**GOOD, "first_name": "Oleg"})
    await post_form(installed, "/robot", body)
    await eventually(
        lambda: any("expired_token" in error for error in portal.recent_errors), what="an expired_token reply"
    )
    assert portal.stats["refreshes"] == refreshes + 1
    assert token not in portal.answers

    # Room on the disk again: the kept pair reaches the file, and work goes on from it.
    disk.free()
    await eventually(
        lambda: portal.refresh_token_alive(_stored(settings, portal)["refresh_token"]),
        timeout=15,
        what="the rotated pair on disk",
    )
    assert (await answer_for(portal, token, timeout=15))["return_values"]["error"] == ""
    assert portal.stats["refreshes"] == refreshes + 2
    assert (await installed.get("/health")).json()["token_store_error"] is None
