"""JsonTokenStore: round trip, missing and corrupt files, file mode, and concurrent writers."""

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from repositories.token_store import CHECK_SECONDS, JsonTokenStore, TokenStoreError
from schemas import PortalTokens

PROJECT = Path(__file__).resolve().parent.parent


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "tokens.json"


def _record(member_id: str = "a223c6b3710f85df22e9377d6c4f7553", **changes: object) -> PortalTokens:
    record = PortalTokens(
        member_id=member_id,
        domain="example.bitrix24.ru",
        client_endpoint="https://example.bitrix24.ru/rest/",
        access_token=f"access-{member_id}",
        refresh_token=f"refresh-{member_id}",
        expires_at=1_900_000_000.0,
        application_token="51856fefc120afa4b628cc82d3935cce",
        scope="crm,bizproc",
        user_id=1,
        updated_at=1_800_000_000.0,
    )
    return record.model_copy(update=changes)


def _temp_files(folder: Path) -> list[str]:
    return sorted(name for name in os.listdir(folder) if name.endswith(".tmp"))


@pytest.mark.anyio
async def test_saved_record_reads_back_equal(path: Path) -> None:
    record = _record()

    await JsonTokenStore(path).save(record)

    assert await JsonTokenStore(path).get(record.member_id) == record


@pytest.mark.anyio
async def test_save_replaces_the_record_of_the_same_portal(path: Path) -> None:
    store = JsonTokenStore(path)
    await store.save(_record(access_token="old"))
    await store.save(_record(access_token="new"))

    records = await JsonTokenStore(path).list()

    assert [record.access_token for record in records] == ["new"]


@pytest.mark.anyio
async def test_missing_file_reads_as_empty(path: Path) -> None:
    store = JsonTokenStore(path)

    assert await store.get("a223c6b3710f85df22e9377d6c4f7553") is None
    assert await store.list() == []
    assert not path.exists()


@pytest.mark.anyio
async def test_delete_forgets_one_portal_only(path: Path) -> None:
    store = JsonTokenStore(path)
    await store.save(_record("portal1"))
    await store.save(_record("portal2"))

    await store.delete("portal1")

    fresh = JsonTokenStore(path)
    assert await fresh.get("portal1") is None
    assert await fresh.get("portal2") == _record("portal2")


@pytest.mark.anyio
async def test_write_by_another_store_is_seen_with_fresh(path: Path) -> None:
    reader, writer = JsonTokenStore(path), JsonTokenStore(path)
    await writer.save(_record(access_token="first"))
    assert (await reader.get(_record().member_id)) is not None

    await writer.save(_record(access_token="second-and-longer"))

    fresh = await reader.get(_record().member_id, fresh=True)
    assert fresh is not None
    assert fresh.access_token == "second-and-longer"


@pytest.mark.anyio
async def test_write_by_another_store_is_seen_without_fresh_within_the_check_interval(path: Path) -> None:
    # A robot call reads without `fresh`: the file is checked at most every CHECK_SECONDS.
    reader, writer = JsonTokenStore(path), JsonTokenStore(path)
    await writer.save(_record(access_token="first"))
    assert (await reader.get(_record().member_id)) is not None
    await writer.save(_record(access_token="second-and-longer"))
    await asyncio.sleep(CHECK_SECONDS)
    seen = await reader.get(_record().member_id)
    assert seen is not None
    assert seen.access_token == "second-and-longer"
    # The reader's own write shows at once.
    await reader.save(_record(access_token="third"))
    own = await reader.get(_record().member_id)
    assert own is not None
    assert own.access_token == "third"


@pytest.mark.anyio
@pytest.mark.parametrize(
    "content",
    [b"{not json", b"[1, 2, 3]", b'{"portals": [1]}', b'{"portals": {"x": {"member_id": "x"}}}', b"\xff\xfe"],
)
async def test_corrupt_file_raises_on_read(path: Path, content: bytes) -> None:
    path.parent.mkdir(parents=True)
    path.write_bytes(content)

    with pytest.raises(TokenStoreError, match="unreadable"):
        await JsonTokenStore(path).get("x")


@pytest.mark.anyio
async def test_corrupt_file_is_never_overwritten(path: Path) -> None:
    path.parent.mkdir(parents=True)
    corrupt = b'{"version": 1, "portals": {"a": {"refresh_token": "the only copy"'
    path.write_bytes(corrupt)
    store = JsonTokenStore(path)

    with pytest.raises(TokenStoreError):
        await store.save(_record())
    with pytest.raises(TokenStoreError):
        await store.delete("a")

    assert path.read_bytes() == corrupt
    assert _temp_files(path.parent) == []


@pytest.mark.anyio
@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")
async def test_file_is_readable_by_the_owner_only(path: Path) -> None:
    await JsonTokenStore(path).save(_record())

    assert path.stat().st_mode & 0o777 == 0o600


@pytest.mark.anyio
async def test_file_is_versioned_json_keyed_by_member_id(path: Path) -> None:
    await JsonTokenStore(path).save(_record())

    data = json.loads(path.read_text(encoding="utf-8"))

    assert data["version"] == 1
    assert data["portals"]["a223c6b3710f85df22e9377d6c4f7553"]["refresh_token"] == (
        "refresh-a223c6b3710f85df22e9377d6c4f7553"
    )


@pytest.mark.anyio
async def test_concurrent_saves_of_many_portals_lose_none(path: Path) -> None:
    store = JsonTokenStore(path)
    members = [f"portal{index:02d}" for index in range(20)]

    await asyncio.gather(*(store.save(_record(member)) for member in members))

    saved = await JsonTokenStore(path).list()
    assert sorted(record.member_id for record in saved) == members
    assert _temp_files(path.parent) == []


_WRITER = """
import asyncio, sys
from pathlib import Path
from repositories.token_store import JsonTokenStore
from schemas import PortalTokens

async def main(path: str, prefix: str) -> None:
    store = JsonTokenStore(Path(path))
    for index in range(50):
        member = f"{prefix}{index:02d}"
        await store.save(PortalTokens(member_id=member, domain="d", client_endpoint="https://d/rest/",
                                      access_token="a-" + member, refresh_token="r-" + member))

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def test_two_processes_saving_at_once_lose_no_record(path: Path) -> None:
    path.parent.mkdir(parents=True)
    writers = [
        subprocess.Popen([sys.executable, "-c", _WRITER, str(path), prefix], cwd=PROJECT)
        for prefix in ("first", "second")
    ]

    assert [writer.wait(timeout=60) for writer in writers] == [0, 0]

    portals = json.loads(path.read_text(encoding="utf-8"))["portals"]
    expected = {f"{prefix}{index:02d}" for prefix in ("first", "second") for index in range(50)}
    assert set(portals) == expected
    assert all(portals[member]["refresh_token"] == f"r-{member}" for member in expected)
    assert _temp_files(path.parent) == []


@pytest.mark.anyio
async def test_refresh_lock_serialises_tasks_of_one_portal(path: Path) -> None:
    store = JsonTokenStore(path)
    inside: list[int] = []
    overlap: list[int] = []

    async def hold(task: int) -> None:
        async with store.refresh_lock("portal1"):
            inside.append(task)
            overlap.append(len(inside))
            await asyncio.sleep(0.01)
            inside.remove(task)

    await asyncio.gather(*(hold(task) for task in range(5)))

    assert overlap == [1, 1, 1, 1, 1]
