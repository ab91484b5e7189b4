"""The one owner of the SQLite state file (`JOB_DB_FILE`): created private, opened once, shared.

Why one owner: on Linux (POSIX), closing *any* descriptor of a file drops *every* fcntl lock the
process holds on that file (fcntl(2), "Advisory record locking"). SQLite's WAL mode relies on
those locks: while a connection is open it holds a shared lock, and the last process to close the
file deletes the -wal file if it can lock the database exclusively. So if anything in the process
opens and closes the database file behind SQLite's back after a connection is open, another
process (a backup, `sqlite3` on the command line, a respawned uvicorn worker) may delete the WAL
under the running app, and every commit written to it afterwards is gone. (SQLite's own
connections in one process are safe: its unix VFS shares one lock record per file and defers
closing descriptors while locks are held, see "How To Corrupt An SQLite Database File", 2.2.)

Therefore: `open_database` gives one `SqliteDatabase` per file and process, shared by the job
journal and the OAuth state store (and by a second back end on the same file, as tests make); it
creates the file with mode 0600 *before* its connection exists; and constructing a second instance
for an open file is refused instead of silently breaking the locks.
"""

import asyncio
import os
import sqlite3
import threading
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import TypeVar

from repositories.storage_error import StorageError

T = TypeVar("T")
# FULL: a commit returns only after the WAL is fsynced, so an acknowledged call survives a power
# cut, not only a crash. The journal's group commit keeps the acknowledgement rate (README).
SYNCHRONOUS = "FULL"
_OPEN: set[Path] = set()
_OPEN_LOCK = threading.Lock()
_SHARED: dict[Path, tuple["SqliteDatabase", int]] = {}


def open_database(path: Path) -> "SqliteDatabase":
    """The process's one `SqliteDatabase` for `path`, opened on first use; `close()` each one."""
    key = path.resolve()
    with _OPEN_LOCK:
        shared = _SHARED.get(key)
        if shared is not None:
            _SHARED[key] = (shared[0], shared[1] + 1)
            return shared[0]
    database = SqliteDatabase(path)
    with _OPEN_LOCK:
        _SHARED[key] = (database, 1)
    database.shared = True
    return database


class SqliteDatabase:
    """The SQLite file and its one connection; every use goes through `run` (serialised)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.shared = False
        self._key = path.resolve()
        with _OPEN_LOCK:
            if self._key in _OPEN:
                raise RuntimeError(f"{path} is already open in this process; share its SqliteDatabase")
            _OPEN.add(self._key)
        try:
            _create_private(path)  # before any connection: see the module docstring
            self._conn = self._connect()
        except (sqlite3.Error, OSError) as exc:
            self._forget()
            raise self.error(exc) from exc
        self._lock = threading.Lock()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={SYNCHRONOUS}")
        return conn

    def run_now(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run `work` on the connection in this thread; storage failures become `StorageError`."""
        with self._lock:
            try:
                return work(self._conn)
            except (sqlite3.Error, OSError) as exc:
                self._roll_back()
                raise self.error(exc) from exc
            except BaseException:
                # Any other failure in the middle of a transaction (a bug, a bad value) must not
                # leave it open: every later BEGIN on this one connection would fail.
                self._roll_back()
                raise

    def _roll_back(self) -> None:
        if self._conn.in_transaction:
            with suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")

    async def run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """`run_now` in a worker thread, off the event loop."""
        return await asyncio.to_thread(self.run_now, work)

    def error(self, exc: BaseException) -> StorageError:
        cause = str(exc) or type(exc).__name__
        return StorageError(f"The job journal {self.path} cannot be used: {cause}.")

    def close(self) -> None:
        if self.shared:
            with _OPEN_LOCK:
                database, users = _SHARED[self._key]
                if users > 1:
                    _SHARED[self._key] = (database, users - 1)
                    return
                del _SHARED[self._key]
        with self._lock:
            try:
                self._conn.close()
            finally:
                self._forget()

    def _forget(self) -> None:
        with _OPEN_LOCK:
            _OPEN.discard(self._key)


def transaction(conn: sqlite3.Connection, work: Callable[[sqlite3.Connection], T]) -> T:
    """`work` inside one write transaction: all of it is committed (one fsync), or none."""
    conn.execute("BEGIN IMMEDIATE")
    result = work(conn)
    conn.execute("COMMIT")
    return result


def _create_private(path: Path) -> None:
    """Create the file readable by its owner only: it holds event and access tokens.

    SQLite gives its -wal and -shm files the same permissions.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
