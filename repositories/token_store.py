"""Portal tokens, one record per `member_id`, behind a small repository interface.

`JsonTokenStore` keeps them in one JSON file. Every write holds a file lock beside the file, so
several worker processes (`uvicorn --workers 4`) never lose each other's records, and goes through a
temporary file, fsync and `os.replace`, so a crash leaves the old file or the new one, never half.
A corrupt file is reported and never overwritten: it holds the only copy of the refresh tokens.
Every OS error (a read-only folder, a full disk, a permission) becomes `TokenStoreError` naming the
file and the cause.

A pair the OAuth server has just rotated is never lost: if the file cannot take it, the store keeps
it in memory (`get` returns it), keeps holding that portal's refresh lock so that no process
refreshes with the dead token on disk, and writes it on a later `flush`.
"""

import asyncio
import errno
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any, Protocol

from filelock import FileLock, Timeout
from pydantic import ValidationError

from repositories.token_cipher import TokenCipher, TokenKeyError
from schemas import PortalTokens

logger = logging.getLogger(__name__)

_FORMAT_VERSION = 1
# How long a read without `fresh` may go on trusting the cached file after it last checked it:
# another process's write shows within this (the PostgreSQL store's copy lives 1 s). This
# process's own writes show at once; a refresh reads `fresh` under its lock.
CHECK_SECONDS = 0.25
_LOCK_TIMEOUT = 30.0


class TokenStoreError(Exception):
    """The token file exists but cannot be read or written."""


class TokenKeyMismatch(TokenStoreError):
    """The stored tokens are encrypted with another key than TOKEN_ENCRYPTION_KEY (or with none)."""


def _os_error(path: Path, action: str, exc: OSError) -> TokenStoreError:
    cause = exc.strerror or type(exc).__name__
    code = f", {errno.errorcode[exc.errno]}" if exc.errno and exc.errno in errno.errorcode else ""
    return TokenStoreError(f"The token file {path} cannot be {action}: {cause}{code}.")


class TokenStore(Protocol):
    async def get(self, member_id: str, *, fresh: bool = False) -> PortalTokens | None: ...

    async def list(self) -> list[PortalTokens]: ...

    async def save(self, record: PortalTokens) -> None: ...

    async def delete(self, member_id: str) -> None: ...

    async def save_rotated(self, record: PortalTokens) -> None:
        """Save a pair the OAuth server has just rotated; call it inside `refresh_lock`.

        When the pair cannot be written it is kept: `get` returns it, the refresh lock stays held
        until it is written, and `flush` retries. It is logged, and `unsaved` reports it.
        """
        ...

    async def flush(self, member_id: str | None = None) -> None:
        """Write the kept pairs (of one portal, or all); TokenStoreError while it still fails."""
        ...

    def unsaved(self) -> dict[str, str]:
        """`member_id` -> why its newest tokens are only in memory."""
        ...

    def refresh_lock(self, member_id: str) -> AbstractAsyncContextManager[None]:
        """Held while one portal's tokens are refreshed, across tasks and processes."""
        ...


Records = dict[str, PortalTokens]


class JsonTokenStore:
    """The JSON-file implementation of `TokenStore`."""

    def __init__(self, path: Path, cipher: TokenCipher | None = None) -> None:
        self._path = path
        self._file = str(path)
        self._cipher = cipher or TokenCipher(None)
        self._write_lock_path = path.with_name(path.name + ".lock")
        self._thread_lock = threading.Lock()
        self._cache: tuple[tuple[int, int], Records] | None = None
        self._checked_until = 0.0  # monotonic time until which the cache is trusted unchecked
        self._refresh_locks: dict[str, asyncio.Lock] = {}
        self._kept: dict[str, tuple[PortalTokens, TokenStoreError]] = {}  # rotated, not yet on disk
        self._held: dict[str, FileLock] = {}  # refresh locks held until the kept pair is on disk

    @property
    def path(self) -> Path:
        return self._path

    async def get(self, member_id: str, *, fresh: bool = False) -> PortalTokens | None:
        """The portal's record; `fresh` bypasses the cache (another process may have written)."""
        return _newest(self._kept_record(member_id), (await self._records(fresh)).get(member_id))

    async def list(self) -> list[PortalTokens]:
        records = dict(await self._records(False))
        for member_id, (kept, _) in list(self._kept.items()):
            records[member_id] = _newest(kept, records.get(member_id)) or kept
        return list(records.values())

    async def _records(self, fresh: bool) -> Records:
        # Every robot call reads the store: an unchanged file is served from memory, checked with
        # one stat() at most every CHECK_SECONDS, without the thread hop that reading and parsing
        # would need. (A stat() per call was a system call that let the journal's thread take the
        # GIL from the event loop, and 1-2 % of the loop's samples under load.)
        cache = self._cache
        if not fresh and cache is not None:
            now = time.monotonic()
            if now < self._checked_until:
                return cache[1]
            try:
                stat = os.stat(self._file)  # a str: Path.stat() costs as much again in Python
            except FileNotFoundError:
                stat = None
            if stat is not None and cache[0] == (stat.st_mtime_ns, stat.st_size):
                self._checked_until = now + CHECK_SECONDS
                return cache[1]
        return await asyncio.to_thread(self._read, fresh)

    async def save(self, record: PortalTokens) -> None:
        await asyncio.to_thread(self._mutate, lambda records: records.__setitem__(record.member_id, record))
        self._settle(record.member_id, record)

    async def delete(self, member_id: str) -> None:
        await asyncio.to_thread(self._mutate, lambda records: records.pop(member_id, None))
        self._settle(member_id, None)

    async def save_rotated(self, record: PortalTokens) -> None:
        try:
            await self.save(record)
        except TokenStoreError as exc:
            self._kept[record.member_id] = (record, exc)
            logger.error(
                "%s The new tokens of portal %s are kept in memory and saved as soon as the file can "
                "be written; until then no process refreshes them again.",
                exc,
                record.domain,
            )

    async def flush(self, member_id: str | None = None) -> None:
        for key in [member_id] if member_id else list(self._kept):
            kept = self._kept.get(key or "")
            if kept is not None:
                await self._flush_one(kept[0])

    async def _flush_one(self, record: PortalTokens) -> None:
        def put(records: Records) -> None:
            # Unless another process has stored a later record meanwhile (a new install).
            records[record.member_id] = _newest(record, records.get(record.member_id)) or record

        try:
            await asyncio.to_thread(self._mutate, put)
        except TokenStoreError as exc:
            self._kept[record.member_id] = (record, exc)
            raise
        self._settle(record.member_id, record)
        logger.info("The kept tokens of portal %s are saved to %s", record.domain, self._path)

    def unsaved(self) -> dict[str, str]:
        return {member_id: str(error) for member_id, (_, error) in self._kept.items()}

    def _kept_record(self, member_id: str) -> PortalTokens | None:
        kept = self._kept.get(member_id)
        return kept[0] if kept else None

    def _settle(self, member_id: str, saved: PortalTokens | None) -> None:
        """A write of the portal's record that supersedes its kept pair ends the keeping."""
        kept = self._kept_record(member_id)
        if kept is not None and saved is not None and saved.updated_at < kept.updated_at:
            return  # a record read before the rotation: the kept pair is still the newest
        self._kept.pop(member_id, None)
        held = self._held.pop(member_id, None)
        if held is not None:
            held.release()

    def refresh_lock(self, member_id: str) -> AbstractAsyncContextManager[None]:
        return self._refresh_lock(member_id)

    @asynccontextmanager
    async def _refresh_lock(self, member_id: str) -> AsyncIterator[None]:
        # The asyncio lock queues this process's tasks; the file lock queues other processes.
        local = self._refresh_locks.setdefault(member_id, asyncio.Lock())
        async with local:
            # Still held from a refresh whose pair is not on disk yet: this process owns it.
            lock = self._held.pop(member_id, None)
            if lock is None:
                lock = FileLock(
                    self._path.with_name(f"{self._path.name}.{member_id}.refresh.lock"), thread_local=False
                )
                await _acquire_polling(lock, self._path, member_id)
            try:
                yield
            finally:
                if member_id in self._kept:
                    self._held[member_id] = lock
                else:
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
        except OSError as exc:
            raise _os_error(self._path, "written", exc) from exc

    def _load(self, fresh: bool) -> Records:
        try:
            stat = self._path.stat()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise _os_error(self._path, "read", exc) from exc
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


async def _acquire_polling(lock: FileLock, path: Path, member_id: str) -> None:
    """Take the file lock without a blocked thread: a cancelled task must not leave one behind."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _LOCK_TIMEOUT
    while True:
        try:
            lock.acquire(blocking=False)
            return
        except Timeout:
            if loop.time() > deadline:
                raise TokenStoreError(
                    f"Timed out waiting for the refresh lock of portal {member_id} beside {path}: another "
                    "process is refreshing, or holds new tokens it cannot save yet (see its log)."
                ) from None
            await asyncio.sleep(0.02)
        except OSError as exc:
            raise _os_error(path, "locked for a refresh", exc) from exc


def _newest(kept: PortalTokens | None, stored: PortalTokens | None) -> PortalTokens | None:
    """The kept pair, unless the file holds a later record (another process installed anew)."""
    if kept is None or (stored is not None and stored.updated_at > kept.updated_at):
        return stored
    return kept


def _parse(path: Path, cipher: TokenCipher) -> Records:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise _os_error(path, "read", exc) from exc
    try:
        data = json.loads(raw.decode("utf-8") or "{}")
        portals = data.get("portals", {}) if data else {}
        return {key: PortalTokens.model_validate(cipher.open(value)) for key, value in portals.items()}
    except TokenKeyError as exc:
        raise TokenKeyMismatch(f"{exc}; the app will not overwrite {path}.") from exc
    except (ValueError, AttributeError, ValidationError) as exc:
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


async def amend(
    tokens: TokenStore,
    member_id: str,
    changes: dict[str, Any],
    only_if: Callable[[PortalTokens], bool] | None = None,
) -> PortalTokens | None:
    """Change a portal's fields beside its tokens (robot state, user, language); None if not stored.

    Under the refresh lock and from a fresh read: a copy read earlier may hold a pair that another
    task or instance has rotated since, and writing it back would restore a spent refresh token.
    With `only_if`, the fresh record is changed only if it says so, and returned as read if not.
    """
    async with tokens.refresh_lock(member_id):
        record = await tokens.get(member_id, fresh=True)
        if record is None:
            return None
        if only_if is not None and not only_if(record):
            return record
        updated = record.model_copy(update=changes)
        await tokens.save(updated)
        return updated
