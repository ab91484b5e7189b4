"""Portal tokens, one record per `member_id`, behind a small repository interface.

`JsonTokenStore` keeps them in one JSON file. Every write holds a file lock beside the file, so
several worker processes (`uvicorn --workers 4`) never lose each other's records, and goes through a
temporary file, fsync and `os.replace`, so a crash leaves the old file or the new one, never half.
A corrupt file is reported and never overwritten: it holds the only copy of the refresh tokens.
"""

import asyncio
import json
import os
import tempfile
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any, Protocol

from filelock import FileLock, Timeout
from pydantic import ValidationError

from repositories.token_cipher import TokenCipher, TokenKeyError
from schemas import PortalTokens

_FORMAT_VERSION = 1
_LOCK_TIMEOUT = 30.0


class TokenStoreError(Exception):
    """The token file exists but cannot be read or written."""


class TokenKeyMismatch(TokenStoreError):
    """The stored tokens are encrypted with another key than TOKEN_ENCRYPTION_KEY (or with none)."""


class TokenStore(Protocol):
    async def get(self, member_id: str, *, fresh: bool = False) -> PortalTokens | None: ...

    async def list(self) -> list[PortalTokens]: ...

    async def save(self, record: PortalTokens) -> None: ...

    async def delete(self, member_id: str) -> None: ...

    def refresh_lock(self, member_id: str) -> AbstractAsyncContextManager[None]:
        """Held while one portal's tokens are refreshed, across tasks and processes."""
        ...


Records = dict[str, PortalTokens]


class JsonTokenStore:
    """The JSON-file implementation of `TokenStore`."""

    def __init__(self, path: Path, cipher: TokenCipher | None = None) -> None:
        self._path = path
        self._cipher = cipher or TokenCipher(None)
        self._write_lock_path = path.with_name(path.name + ".lock")
        self._thread_lock = threading.Lock()
        self._cache: tuple[tuple[int, int], Records] | None = None
        self._refresh_locks: dict[str, asyncio.Lock] = {}

    @property
    def path(self) -> Path:
        return self._path

    async def get(self, member_id: str, *, fresh: bool = False) -> PortalTokens | None:
        """The portal's record; `fresh` bypasses the cache (another process may have written)."""
        return (await self._records(fresh)).get(member_id)

    async def list(self) -> list[PortalTokens]:
        return list((await self._records(False)).values())

    async def _records(self, fresh: bool) -> Records:
        # Every robot call reads the store: an unchanged file is served from memory after one
        # stat() (microseconds), without the thread hop that reading and parsing would need.
        cache = self._cache
        if not fresh and cache is not None:
            try:
                stat = self._path.stat()
            except FileNotFoundError:
                stat = None
            if stat is not None and cache[0] == (stat.st_mtime_ns, stat.st_size):
                return cache[1]
        return await asyncio.to_thread(self._read, fresh)

    async def save(self, record: PortalTokens) -> None:
        await asyncio.to_thread(self._mutate, lambda records: records.__setitem__(record.member_id, record))

    async def delete(self, member_id: str) -> None:
        await asyncio.to_thread(self._mutate, lambda records: records.pop(member_id, None))

    def refresh_lock(self, member_id: str) -> AbstractAsyncContextManager[None]:
        return self._refresh_lock(member_id)

    @asynccontextmanager
    async def _refresh_lock(self, member_id: str) -> AsyncIterator[None]:
        # The asyncio lock queues this process's tasks; the file lock queues other processes.
        local = self._refresh_locks.setdefault(member_id, asyncio.Lock())
        async with local:
            lock = FileLock(
                self._path.with_name(f"{self._path.name}.{member_id}.refresh.lock"), thread_local=False
            )
            await _acquire_polling(lock, member_id)
            try:
                yield
            finally:
                lock.release()

    def _read(self, fresh: bool) -> Records:
        with self._thread_lock:
            return dict(self._load(fresh))

    def _mutate(self, change: Callable[[Records], Any]) -> None:
        lock = FileLock(self._write_lock_path, thread_local=False)
        try:
            with self._thread_lock, lock.acquire(timeout=_LOCK_TIMEOUT):
                records = dict(self._load(fresh=True))
                change(records)
                self._write(records)
        except Timeout as exc:
            raise TokenStoreError(f"Timed out waiting for the lock on {self._path}") from exc

    def _load(self, fresh: bool) -> Records:
        try:
            stat = self._path.stat()
        except FileNotFoundError:
            return {}
        signature = (stat.st_mtime_ns, stat.st_size)
        if not fresh and self._cache and self._cache[0] == signature:
            return self._cache[1]
        records = _parse(self._path, self._cipher)
        self._cache = (signature, records)
        return records

    def _write(self, records: Records) -> None:
        payload = {
            "version": _FORMAT_VERSION,
            "portals": {
                key: self._cipher.seal(record.model_dump(mode="json")) for key, record in records.items()
            },
        }
        _atomic_write(self._path, json.dumps(payload, indent=2, ensure_ascii=False))
        stat = self._path.stat()
        self._cache = ((stat.st_mtime_ns, stat.st_size), records)


async def _acquire_polling(lock: FileLock, member_id: str) -> None:
    """Take the file lock without a blocked thread: a cancelled task must not leave one behind."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _LOCK_TIMEOUT
    while True:
        try:
            lock.acquire(blocking=False)
            return
        except Timeout:
            if loop.time() > deadline:
                raise TokenStoreError(f"Timed out waiting for the refresh lock of {member_id}") from None
            await asyncio.sleep(0.02)


def _parse(path: Path, cipher: TokenCipher) -> Records:
    try:
        data = json.loads(path.read_text(encoding="utf-8") or "{}")
        portals = data.get("portals", {}) if data else {}
        return {key: PortalTokens.model_validate(cipher.open(value)) for key, value in portals.items()}
    except TokenKeyError as exc:
        raise TokenKeyMismatch(f"{exc}; the app will not overwrite {path}.") from exc
    except (OSError, ValueError, AttributeError, ValidationError) as exc:
        raise TokenStoreError(
            f"The token file {path} is unreadable ({type(exc).__name__}); the app will not "
            "overwrite it. Restore it from a backup, or move it away and install the app again."
        ) from exc


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable on POSIX; Windows has no directory handles to sync.
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
